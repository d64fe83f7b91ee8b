# Sourced by recipes (after parse_options.sh and log.sh): stage bookkeeping with .done markers under exp/.done/.
#   if should_run 3 tokenizer; then ...; mark_done tokenizer; fi
# A stage runs when it lies in --stage..--stop-stage and has no marker; its marker is written only after it
# succeeded, so a failed stage runs again on the next run (training then resumes from its last checkpoint).
# Markers do not record options: a finished stage is skipped whatever the options are now, so the skip message
# says how to run it again.
done_marker() { echo "exp/.done/$1"; }
should_run() {
  local n=$1 name=$2
  [ "$stage" -le "$n" ] && [ "$stop_stage" -ge "$n" ] || return 1
  if [ -f "$(done_marker "$name")" ]; then
    log "stage $n ($name): already done ($(done_marker "$name"); with other options now, remove that marker and" \
      "those of the stages after it, or use a fresh directory)"
    return 1
  fi
  log "stage $n: $name"
}
mark_done() { mkdir -p exp/.done; touch "$(done_marker "$1")"; }
