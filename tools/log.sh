# Sourced by recipes and tools: log MESSAGE prints the time and the caller's file:line, as icefall's recipes do
# (the recipe's line, also when the call comes through a helper of tools/stages.sh).
# free_disk DIR prints the space left on DIR's file system, e.g. 54G.
free_disk() { df -h --output=avail "$1" | tail -n 1 | tr -d ' '; }

log() {
  local i=1
  while [ "${BASH_SOURCE[$i]##*/}" = stages.sh ] && [ -n "${BASH_SOURCE[$((i + 1))]:-}" ]; do i=$((i + 1)); done
  echo -e "$(date '+%Y-%m-%d %H:%M:%S') (${BASH_SOURCE[$i]##*/}:${BASH_LINENO[$((i - 1))]}:${FUNCNAME[$i]:-main}) $*"
}
