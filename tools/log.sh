# Sourced by recipes and tools: log MESSAGE prints the time and the caller's file:line, as icefall's recipes do
# (the recipe's line, also when the call comes through a helper of tools/stages.sh).
log() {
  local i=1
  while [ "${BASH_SOURCE[$i]##*/}" = stages.sh ] && [ -n "${BASH_SOURCE[$((i + 1))]:-}" ]; do i=$((i + 1)); done
  echo -e "$(date '+%Y-%m-%d %H:%M:%S') (${BASH_SOURCE[$i]##*/}:${BASH_LINENO[$((i - 1))]}:${FUNCNAME[$i]:-main}) $*"
}
