#!/usr/bin/env bash
# LibriSpeech: Speech-LLaMA with K=4 MTP heads and a ~125M-parameter LLaMA decoder (the paper's size), trained with
# torchrun on the GPUs at hand, decoded on test-clean/test-other with every method. Bring your own corpus
# (--corpus-dir: the LibriSpeech directory, or its parent). Everything it makes goes under data/ and exp/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

stage=0
stop_stage=100
corpus_dir=download/LibriSpeech
train_parts="train-clean-100 train-clean-360 train-other-500"
dev_parts="dev-clean dev-other"
test_parts="test-clean test-other"
nj=8
vocab_size=5000
hf_llm=""          # a Hugging Face LLaMA directory: its weights start the decoder, its tokenizer replaces the BPE
ctc_vocab_size=500 # the CTC head's own N-piece unigram model (data/lang_ctc_unigram_N): a small CTC head that
                   # learns fast (icefall's LibriSpeech CTC models use 500), whatever the decoder's vocabulary
                   # (5000 pieces, or an LLM's 32k); ctc-verify re-tokenises its drafts. 0: the decoder's tokens
lm_conf=conf/lm_125m.yaml
train_conf=conf/train_125m.yaml
lm_epochs=10
asr_epochs=30
avg=5
distill_steps=2000 # self-distillation of heads 2..K (stage 7); 0 skips it
distill_cuts=5000  # training cuts decoded for it
ngpu=auto          # processes for torchrun (auto: the number of GPUs, 1 without any)
thresholds="0.6 0.8 0.9"
draft_tree_nodes=24  # stage 8 also runs mtp-verify and ctc-verify with a draft tree of this many nodes fitted on
                     # dev; 0 skips
decode_batch_size=32
beam_size=4
beam_threshold=0.8 # tau of mtp-beam
joint_ctc_weight=0.3 # stage 8: joint CTC/attention beam and mtp-beam-verify with this CTC weight (ESPnet's
                     # LibriSpeech decoding uses 0.3-0.4; not measured here); needs --ctc-vocab-size 0; 0 skips them
mwer_conf=conf/mwer.yaml
mwer_epochs=1
device=auto
train_args=""      # more `--set key=value` overrides for training, e.g. "--set data.max_duration=300"
lexicon=""         # a word list or Kaldi lexicon (e.g. librispeech-lexicon.txt): stages 8 and 10 decode with its
                   # words only (a closed vocabulary); "": any token sequence
word_lm=""         # a word n-gram LM, ARPA (e.g. openslr.org/11's 3-gram.pruned.1e-7.arpa.gz, or `mtp-asr
                   # train-ngram` on librispeech-lm-norm.txt); with --lexicon, stage 8's joint rows fuse it
lm_weight=0.5      # its weight (the demo's dev choice; not measured on LibriSpeech)

help_message="Usage: $0 --corpus-dir DIR [options]

Stages (--stage N --stop-stage M; finished stages are skipped through exp/.done markers, which do not record the
options: to redo a stage with other options, remove its marker and those after it):
  0  install the environment (tools/install.sh)
  1  Lhotse manifests for every LibriSpeech part found (data/manifests)
  2  80-dim fbank (data/fbank)
  3  tokenizer: a sentencepiece unigram model (data/lang_bpe_<vocab_size>), or the --hf-llm directory's; and the CTC
     head's own (data/lang_ctc_unigram_<ctc_vocab_size>; --ctc-vocab-size 0: the CTC head uses the decoder's)
  4  pre-train the decoder LM on the training transcripts (exp/lm; skipped with --hf-llm; add LibriSpeech's
     LM corpus with --train-args '--set data.train_text=[...,librispeech-lm-norm.txt]')
  5  train Speech-LLaMA (exp/asr; torchrun over --ngpu processes)
  6  average the last --avg epochs
  7  self-distil heads 2..K on the model's own greedy transcripts of --distill-cuts training cuts (--distill-steps 0
     skips it; greedy output does not change)
  8  decode the test parts: the CTC head alone (ctc; best path, and with --lexicon a beam search over its words),
     greedy, mtp-threshold (a sweep), mtp-verify and ctc-verify (also with a draft tree fitted on dev, ctc-verify
     then with --draft-branches 2), ctc-rescore, beam, mtp-beam, mtp-beam-verify; beam and mtp-beam-verify also
     as joint decoding: with CTC prefix scores (--joint-ctc-weight, when --ctc-vocab-size 0) and with a word LM
     (--word-lm, --lm-weight)
  9  MWER fine-tuning on mtp-beam N-best lists (exp/mwer; torchrun over --ngpu processes)
  10 decode the MWER model: greedy, mtp-verify, mtp-beam
  11 results table: exp/summary.json and exp/summary.md

Options (default):
  --corpus-dir ($corpus_dir)  --train-parts ($train_parts)
  --dev-parts ($dev_parts)  --test-parts ($test_parts)  --nj ($nj)
  --vocab-size ($vocab_size)  --hf-llm (none)  --ctc-vocab-size ($ctc_vocab_size; 0: the decoder's tokens)
  --lm-conf ($lm_conf)  --train-conf ($train_conf)
  --lm-epochs ($lm_epochs)  --asr-epochs ($asr_epochs)  --avg ($avg)  --ngpu ($ngpu)
  --distill-steps ($distill_steps)  --distill-cuts ($distill_cuts)
  --thresholds (\"$thresholds\")  --draft-tree-nodes ($draft_tree_nodes)  --decode-batch-size ($decode_batch_size)
  --device ($device)
  --beam-size ($beam_size)  --beam-threshold ($beam_threshold)  --mwer-conf ($mwer_conf)  --mwer-epochs ($mwer_epochs)
  --joint-ctc-weight ($joint_ctc_weight; 0 skips the joint rows)
  --train-args (\"\")  extra --set overrides for stages 4, 5 and 9
  --lexicon (\"\")  a word list or Kaldi lexicon: stages 8 and 10 emit only its words
  --word-lm (\"\")  an ARPA word LM (needs --lexicon)  --lm-weight ($lm_weight)
"

. tools/parse_options.sh
. tools/log.sh
. tools/stages.sh
. tools/decode.sh

if [ -n "$word_lm" ] && [ -z "$lexicon" ]; then
  log "--word-lm $word_lm needs --lexicon: the LM scores words, so the searches must spell known ones"; exit 1
fi

venv=tools/venv
if [ -x "$venv/bin/mtp-asr" ]; then
  export PATH="$PWD/$venv/bin:$PATH"
fi

existing() {  # the parts of "$@" that stage 1 prepared; the others are named in a warning
  local p
  for p in "$@"; do
    if [ -f "data/fbank/cuts_$p.jsonl.gz" ]; then
      echo "$p"
    else
      log "no data/fbank/cuts_$p.jsonl.gz: part $p left out" >&2
    fi
  done
}

# One process, or torchrun over several (one per GPU).
train() {
  local n=$ngpu
  if [ "$n" = auto ]; then
    n=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
  fi
  if [ "$n" -gt 1 ]; then
    torchrun --standalone --nproc_per_node "$n" "$(command -v mtp-asr)" "$@"
  else
    mtp-asr "$@"
  fi
}

if should_run 0 install; then
  bash tools/install.sh
  export PATH="$PWD/$venv/bin:$PATH"
  mark_done install
fi

if should_run 1 prepare; then
  mtp-asr prepare librispeech "$corpus_dir" data/manifests --jobs "$nj"
  mark_done prepare
fi

if should_run 2 fbank; then
  mtp-asr compute-fbank data/manifests data/fbank --jobs "$nj"
  mark_done fbank
fi

if [ "$stop_stage" -lt 3 ]; then exit 0; fi  # the stages below need the prepared parts
train_cuts=$(existing $train_parts)
[ -n "$train_cuts" ] || { log "no training part among: $train_parts (prepared: $(ls data/fbank 2>/dev/null))"; exit 1; }
dev_cuts=$(existing $dev_parts)
list_arg() {  # "a b" -> "[data/fbank/cuts_a.jsonl.gz, ...]"
  local out="" p
  for p in "$@"; do out="$out${out:+, }data/fbank/cuts_$p.jsonl.gz"; done
  echo "[$out]"
}

if [ -n "$hf_llm" ]; then
  tokenizer=$hf_llm/tokenizer.model
else
  tokenizer=data/lang_bpe_$vocab_size/tokenizer.model
fi

ctc_args=()
if [ "$ctc_vocab_size" -gt 0 ]; then
  ctc_lang=data/lang_ctc_unigram_$ctc_vocab_size
  ctc_args=(--set "data.ctc_tokenizer=$ctc_lang/tokenizer.model")
fi

if should_run 3 tokenizer; then
  if [ "$ctc_vocab_size" -gt 0 ]; then
    mtp-asr train-bpe $(for p in $train_cuts; do echo "data/fbank/cuts_$p.jsonl.gz"; done) \
      "$ctc_lang" --vocab-size "$ctc_vocab_size" --model-type unigram
  fi
  if [ -z "$hf_llm" ]; then
    mtp-asr train-bpe $(for p in $train_cuts; do echo "data/fbank/cuts_$p.jsonl.gz"; done) \
      "data/lang_bpe_$vocab_size" --vocab-size "$vocab_size" --model-type unigram
  elif [ ! -f "$tokenizer" ]; then
    log "--hf-llm $hf_llm has no tokenizer.model (a sentencepiece LLaMA tokenizer is needed)"
    exit 1
  fi
  mark_done tokenizer
fi

if [ -n "$hf_llm" ]; then
  init_lm=$hf_llm
else
  init_lm=exp/lm/epoch-$lm_epochs.pt
  if should_run 4 lm; then
    # shellcheck disable=SC2086  # train_args holds several words on purpose
    train pretrain-lm -c "$lm_conf" --exp-dir exp/lm --set "data.tokenizer=$tokenizer" --set "num_epochs=$lm_epochs" \
      --set "data.train_text=$(list_arg $train_cuts)" --set "data.valid_text=$(list_arg $dev_cuts)" $train_args
    mark_done lm
  fi
fi

if should_run 5 asr; then
  # shellcheck disable=SC2086
  train train -c "$train_conf" --exp-dir exp/asr --set "data.tokenizer=$tokenizer" --set "num_epochs=$asr_epochs" \
    --set "init_lm=$init_lm" --set "data.train_cuts=$(list_arg $train_cuts)" \
    --set "data.valid_cuts=$(list_arg $dev_cuts)" ${ctc_args[@]+"${ctc_args[@]}"} $train_args
  mark_done asr
fi

averaged=exp/asr/avg-epoch-$asr_epochs-avg-$avg.pt
if should_run 6 average; then
  mtp-asr average --exp-dir exp/asr --epoch "$asr_epochs" --avg "$avg" --out "$averaged"
  mark_done average
fi

model=$averaged
if [ "$distill_steps" -gt 0 ]; then
  model=${averaged%.pt}-distilled.pt
  if should_run 7 distill; then
    cuts_args=()
    for p in $train_cuts; do cuts_args+=(--cuts "data/fbank/cuts_$p.jsonl.gz"); done
    mtp-asr distill-heads --checkpoint "$averaged" "${cuts_args[@]}" --out "$model" --steps "$distill_steps" \
      --max-cuts "$distill_cuts" --batch-size "$decode_batch_size" --device "$device"
    mark_done distill
  fi
fi

decode_sets=$(existing $test_parts)
lex_args=()
if [ -n "$lexicon" ]; then lex_args=(--lexicon "$lexicon"); fi

if should_run 8 decode; then
  threshold_args=()
  for t in $thresholds; do threshold_args+=(--threshold "$t"); done
  decode_all "$model" exp/asr/decode "greedy mtp-threshold mtp-verify ctc-verify ctc-rescore" \
    "${threshold_args[@]}" ${lex_args[@]+"${lex_args[@]}"}
  # The encoder's CTC head alone, what the LLM decoder adds to it: best path, and with a lexicon a beam search.
  decode_all "$model" exp/asr/decode ctc --ctc-beam-size 1
  if [ -n "$lexicon" ]; then decode_all "$model" exp/asr/decode ctc ${lex_args[@]+"${lex_args[@]}"}; fi
  if [ "$draft_tree_nodes" -gt 0 ] && [ -n "$dev_cuts" ]; then
    decode_fitted_tree "$model" exp/asr/decode "$draft_tree_nodes" "$dev_cuts" mtp-verify \
      ${lex_args[@]+"${lex_args[@]}"}
    # ctc-verify with the tree also verifies the CTC draft from both readings of each correction (--draft-branches)
    tree=$(cat "exp/asr/decode/draft-tree-$draft_tree_nodes.txt")
    decode_all "$model" exp/asr/decode ctc-verify --draft-tree "$tree" \
      --draft-branches 2 ${lex_args[@]+"${lex_args[@]}"}
  fi
  decode_all "$model" exp/asr/decode "beam mtp-beam mtp-beam-verify" --beam-size "$beam_size" \
    --threshold "$beam_threshold" \
    ${lex_args[@]+"${lex_args[@]}"}
  # Joint decoding: the CTC head's prefix scores (only when it predicts the decoder's tokens) and the word LM.
  joint_args=()
  if [ "$joint_ctc_weight" != 0 ] && [ "$ctc_vocab_size" -eq 0 ]; then
    joint_args+=(--ctc-weight "$joint_ctc_weight")
  fi
  if [ -n "$word_lm" ]; then joint_args+=(--word-lm "$word_lm" --lm-weight "$lm_weight"); fi
  if [ ${#joint_args[@]} -gt 0 ]; then
    decode_all "$model" exp/asr/decode "beam mtp-beam-verify" --beam-size "$beam_size" "${joint_args[@]}" \
      ${lex_args[@]+"${lex_args[@]}"}
  fi
  mark_done decode
fi

if should_run 9 mwer; then
  # shellcheck disable=SC2086
  train mwer -c "$mwer_conf" --init "$model" --exp-dir exp/mwer --set "num_epochs=$mwer_epochs" \
    --set "beam_size=$beam_size" --set "threshold=$beam_threshold" --set "data.train_cuts=$(list_arg $train_cuts)" \
    --set "data.valid_cuts=$(list_arg $dev_cuts)" $train_args
  mark_done mwer
fi

if should_run 10 mwer_decode; then
  mwer_model=exp/mwer/epoch-$mwer_epochs.pt
  decode_all "$mwer_model" exp/mwer/decode "greedy mtp-verify" ${lex_args[@]+"${lex_args[@]}"}
  decode_all "$mwer_model" exp/mwer/decode mtp-beam --beam-size "$beam_size" --threshold "$beam_threshold" \
    ${lex_args[@]+"${lex_args[@]}"}
  mark_done mwer_decode
fi

if [ "$stage" -le 11 ] && [ "$stop_stage" -ge 11 ]; then
  log "stage 11: results table"
  mtp-asr summarize exp/asr/decode exp/mwer/decode --out exp/summary.json
fi
