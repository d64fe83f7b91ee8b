# Sourced by recipes and tools: log MESSAGE prints the time and the caller's file:line, as icefall's recipes do.
log() {
  local fname=${BASH_SOURCE[1]##*/}
  echo -e "$(date '+%Y-%m-%d %H:%M:%S') (${fname}:${BASH_LINENO[0]}:${FUNCNAME[1]:-main}) $*"
}
