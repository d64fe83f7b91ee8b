# Sourced by recipes after their defaults are set: turns "--some-option value" (or "--some-option=value") into
# some_option=value for every variable the recipe already defined, prints $help_message on --help, and leaves the
# remaining positional arguments in "$@". An unknown option is an error that names it.
__po_positional=()
while [ $# -gt 0 ]; do
  case "$1" in
    --help|-h)
      echo -e "${help_message:-No help available for $0}"
      exit 0 ;;
    --*=*)
      __po_name=${1%%=*}; __po_value=${1#*=}; shift ;;
    --*)
      [ $# -ge 2 ] || { echo "$0: option $1 needs a value" >&2; exit 1; }
      __po_name=$1; __po_value=$2; shift 2 ;;
    *)
      __po_positional+=("$1"); shift; continue ;;
  esac
  __po_var=${__po_name#--}; __po_var=${__po_var//-/_}
  if ! declare -p "$__po_var" >/dev/null 2>&1 || [[ ! "$__po_var" =~ ^[a-zA-Z_][a-zA-Z0-9_]*$ ]]; then
    echo "$0: unknown option $__po_name (see $0 --help)" >&2
    exit 1
  fi
  printf -v "$__po_var" '%s' "$__po_value"
done
set -- ${__po_positional[@]+"${__po_positional[@]}"}
unset __po_name __po_value __po_var __po_positional
