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

# decode_fitted_tree MODEL OUT_DIR NODES "SETS" "METHODS" [decode options...] fits the draft tree of NODES nodes that
# MODEL's heads get accepted most often on data/fbank/cuts_<set>.jsonl.gz for each of SETS (held-out sets: dev),
# keeps it in OUT_DIR/draft-tree-NODES.txt, and decodes every set in $decode_sets with each of METHODS
# (mtp-verify, ctc-verify) and that tree.
decode_fitted_tree() {
  local model=$1 out=$2 nodes=$3 sets=$4 methods=$5 cuts=() s tree=$2/draft-tree-$3.txt
  shift 5
  for s in $sets; do cuts+=(--cuts "data/fbank/cuts_$s.jsonl.gz"); done
  mkdir -p "$out"
  mtp-asr draft-tree --checkpoint "$model" "${cuts[@]}" --nodes "$nodes" --batch-size "$decode_batch_size" \
    --device "$device" > "$tree.tmp"
  mv "$tree.tmp" "$tree"
  decode_all "$model" "$out" "$methods" --draft-tree "$(cat "$tree")" "$@"
}
