# Sourced by recipes: decode_all MODEL OUT_DIR "METHODS" [decode options...] decodes data/fbank/cuts_<set>.jsonl.gz
# for every set in $decode_sets with each method into OUT_DIR/<method>, with the recipe's $decode_batch_size and
# $device; the remaining arguments go to every `mtp-asr decode`.
decode_all() {
  local model=$1 out=$2 methods=$3 method cuts=() s
  shift 3
  for s in $decode_sets; do cuts+=(--cuts "data/fbank/cuts_$s.jsonl.gz"); done
  for method in $methods; do
    mtp-asr decode --checkpoint "$model" "${cuts[@]}" --method "$method" --batch-size "$decode_batch_size" \
      --device "$device" --out-dir "$out/$method" "$@"
  done
}
