#!/usr/bin/env bash
# The demo: a synthetic English corpus (offline TTS voices), Speech-LLaMA with K=4 multi-token-prediction heads, and
# greedy vs MTP decoding, end to end on a CPU. Everything it makes goes under data/ and exp/ (safe to delete).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

stage=0
stop_stage=100
quick=false        # true: a tiny corpus and tiny models, every stage in a few minutes (CI runs this)
hours=16.0         # audio to synthesise (all splits); more audio at the same number of training steps generalises
                   # better than more passes over less (RESULTS.md)
words=800          # the corpus' vocabulary: sentences use only the N most frequent words of the text sources
seed=0
nj=2               # parallel jobs for corpus generation and features
engines=espeak,flite,festival,hibari
token_type=char    # sentencepiece model type: char (learns fastest from little audio), bpe or unigram
vocab_size=40      # an upper bound for char (the corpus has 30 symbols)
ctc_token_type=""  # the CTC head's own tokens (char, bpe, unigram; data/lang_ctc_<type>); "": the decoder's
ctc_vocab_size=40
lm_epochs=0        # decoder pre-training on text; 0 skips it (the decoder then starts from random weights)
ctc_epochs=1       # encoder CTC pre-training; 0 skips it
asr_epochs=3
avg=1
distill_steps=0    # self-distillation of heads 2..K (stage 8; e.g. 600); 0 skips it: with this recipe's hydra heads
                   # the fitted heads agreed less with greedy decoding in every run, so it kept the originals
distill_cuts=500   # training cuts decoded for it
thresholds="0.5 0.8 0.95"
draft_tree_nodes=24  # stage 9 also runs mtp-verify and ctc-verify with a draft tree of this many nodes fitted on
                     # dev; 0 skips
decode_batch_size=16
beam_size=4
beam_threshold=0.93  # tau of mtp-beam: the best dev WER within a third of beam's calls (RESULTS.md)
joint_ctc_weight=0.5  # stage 10: the CTC weight of joint CTC/attention beam and mtp-beam-verify (dev: 0.3-0.6 within
                      # 0.7 points of each other, 0.5 best; RESULTS.md); 0 skips them
word_lm_order=3    # stage 3 trains a word n-gram LM of this order on the corpus' text without audio (ngram_text.txt),
                   # and stage 10's joint searches fuse it (--lm-weight); 0: neither
lm_weight=0.5      # the word LM's weight (dev, joint beam, an LM of nearly the same text: 0.3 / 0.5 / 0.7 / 1.0 ->
                   # 11.84 / 11.50 / 11.67 / 12.36%; no LM 14.27%; RESULTS.md)
lexicon=true       # decode with the training text's words only (data/lang_<type>/words.txt); greedy also without
mwer_steps=30
device=auto
test_sets="test test_unseen_voice"

help_message="Usage: $0 [options]

Stages (--stage N --stop-stage M run a range; finished stages are skipped through exp/.done markers, which do not
record the options: to redo a stage with other options, remove its marker and those after it):
  0  install the environment (tools/install.sh)
  1  synthesise the corpus and prepare Lhotse manifests (data/manifests)
  2  80-dim fbank features (data/fbank)
  3  LM text (data/lm), sentencepiece tokenizer and word list (data/lang_<token_type>), and a word n-gram LM
     (data/lm/word-<N>gram.arpa.gz, --word-lm-order N) of the corpus' text without audio
  4  pre-train the decoder LM with its MTP heads on text (exp/lm; only with --lm-epochs N > 0: from random weights
     the decoder learns to read the audio faster, see RESULTS.md); beside stage 5, one core each
  5  pre-train the encoder with CTC (exp/ctc; --ctc-epochs 0 skips it); alone, on two torchrun ranks
  6  train Speech-LLaMA with K=4 MTP heads (exp/asr; two torchrun ranks on a CPU)
  7  average the last --avg epochs
  8  self-distil heads 2..K on the model's own greedy transcripts of --distill-cuts training cuts (off by default:
     --distill-steps N runs it); the trunk and head 1 stay as they are, so greedy output does not change
  9  decode every test set: the CTC head alone (ctc; best path, and a prefix beam search over the lexicon's
     words), greedy, mtp-threshold (a sweep), mtp-verify and ctc-verify (with a chain of head drafts, and with a
     tree of --draft-tree-nodes drafts fitted on dev by mtp-asr draft-tree; ctc-verify's tree run verifies up to
     32 CTC draft tokens per call, not 8, from two readings of each correction, --draft-branches 2), and
     ctc-rescore (the CTC search's 16 hypotheses scored by the decoder, two calls per utterance)
  10 beam searches: beam, the prefix-based mtp-beam and mtp-beam-verify (--beam-size); beam and mtp-beam-verify
     again as joint CTC/attention decoding (--joint-ctc-weight) fused with the word n-gram LM (--lm-weight)
  11 MWER fine-tuning on mtp-beam N-best lists (exp/mwer; --mwer-steps)
  12 decode the MWER model: greedy, mtp-verify, mtp-beam
  13 results table: exp/summary.json and exp/summary.md

Options (default):
  --quick ($quick)            tiny corpus and models (CI)
  --hours ($hours)            hours of synthetic audio
  --words ($words)             the corpus' vocabulary (most frequent words of the sentence sources)
  --seed ($seed)  --nj ($nj)  --engines ($engines)
  --token-type ($token_type)  --vocab-size ($vocab_size)
  --ctc-token-type (\"$ctc_token_type\": the decoder's tokens)  --ctc-vocab-size ($ctc_vocab_size)
  --lm-epochs ($lm_epochs)  --ctc-epochs ($ctc_epochs)  --asr-epochs ($asr_epochs)  --avg ($avg)
  --distill-steps ($distill_steps)  --distill-cuts ($distill_cuts)
  --thresholds (\"$thresholds\")  --draft-tree-nodes ($draft_tree_nodes)  --decode-batch-size ($decode_batch_size)
  --device ($device)
  --beam-size ($beam_size)  --beam-threshold ($beam_threshold)  --mwer-steps ($mwer_steps)
  --joint-ctc-weight ($joint_ctc_weight; 0 skips the joint rows)
  --word-lm-order ($word_lm_order; 0: no word LM)  --lm-weight ($lm_weight)
  --lexicon ($lexicon)         true: stages 9, 10 and 12 decode with the words of the training text only (a
                              closed vocabulary, as a Kaldi lexicon); greedy also runs without it, for comparison
"

# --quick true changes the defaults, so it is read first; options given on the command line still win.
case " $* " in
  *" --quick true "* | *" --quick=true "*)
    hours=0.03; engines=espeak,flite
    ctc_epochs=1; asr_epochs=3; avg=2; thresholds="0.5 0.9"; mwer_steps=4; distill_steps=50 ;;
esac

. tools/parse_options.sh
. tools/log.sh
. tools/stages.sh
. tools/decode.sh

conf=conf
if [ "$quick" = true ]; then conf=conf/quick; fi
log "settings: quick $quick, $hours h of audio ($engines), $token_type tokens, epochs LM $lm_epochs /" \
  "CTC $ctc_epochs / Speech-LLaMA $asr_epochs (average of $avg), distillation $distill_steps steps, MWER $mwer_steps steps"

venv=tools/venv
if [ -x "$venv/bin/mtp-asr" ]; then
  export PATH="$PWD/$venv/bin:$PATH"
fi
lang=data/lang_$token_type
word_lm=data/lm/word-${word_lm_order}gram.arpa.gz
ctc_args=()
if [ -n "$ctc_token_type" ]; then
  ctc_lang=data/lang_ctc_$ctc_token_type
  ctc_args=(--set "data.ctc_tokenizer=$ctc_lang/tokenizer.model")
fi


# Runs `mtp-asr ARGS...` on the whole machine. On a CPU, as torchrun ranks, one per core up to two, each on one
# thread: one process on two threads is no faster here (small matrix products), two ranks train 1.7x faster at the
# same loss per epoch (egs/synth/asr/RESULTS.md); more ranks would make too few updates per epoch of this corpus.
train_on_cores() {
  local n
  n=$(python3 -c "import os, torch; print(1 if torch.cuda.is_available() else min(2, os.cpu_count() or 1))" \
    2>/dev/null || echo 1)
  if [ "$n" -gt 1 ]; then
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node "$n" "$(command -v mtp-asr)" "$@"
  else
    mtp-asr "$@"
  fi
}

if should_run 0 install; then
  bash tools/install.sh
  export PATH="$PWD/$venv/bin:$PATH"
  mark_done install
fi

if should_run 1 corpus; then
  mtp-asr prepare synth data/manifests --hours "$hours" --words "$words" --seed "$seed" --jobs "$nj" \
    --engines "$engines"
  mark_done corpus
fi

if should_run 2 fbank; then
  mtp-asr compute-fbank data/manifests data/fbank --jobs "$nj"
  mark_done fbank
fi

if should_run 3 tokenizer; then
  # LM text: the generator's lm_text.txt (train passages and unspoken sentences, never a dev/test sentence);
  # the dev transcripts validate it.
  mkdir -p data/lm
  cp data/manifests/corpus/lm_text.txt data/lm/train.txt
  cut -d' ' -f2- data/manifests/corpus/dev/text > data/lm/valid.txt
  mtp-asr train-bpe data/fbank/cuts_train.jsonl.gz "$lang" --vocab-size "$vocab_size" --model-type "$token_type" \
    --extra-text data/lm/train.txt
  # The lexicon: every word of the LM text and the training transcripts (never a dev/test sentence).
  cat data/lm/train.txt <(cut -d' ' -f2- data/manifests/corpus/train/text) | tr -s ' ' '\n' | sed '/^$/d' \
    | LC_ALL=C sort -u > "$lang/words.txt.tmp"
  mv "$lang/words.txt.tmp" "$lang/words.txt"
  if [ -n "$ctc_token_type" ]; then
    mtp-asr train-bpe data/fbank/cuts_train.jsonl.gz "$ctc_lang" --vocab-size "$ctc_vocab_size" \
      --model-type "$ctc_token_type"
  fi
  # The word LM's text: every sentence of the text sources' documents that hold no dev/test sentence (any words;
  # not lm_text.txt, whose passages repeat its sentences and would make the counts overconfident, RESULTS.md).
  if [ "$word_lm_order" -gt 0 ]; then
    mtp-asr train-ngram data/manifests/corpus/ngram_text.txt "$word_lm" --order "$word_lm_order"
  fi
  mark_done tokenizer
fi

# Stages 4 and 5 train different parts (decoder on text, encoder on audio): with both, they run side by side, one
# core each. Stage 5 alone, like stage 6, has the machine to itself (train_on_cores).
pids=()
init_lm=""
if [ "$lm_epochs" -gt 0 ]; then
  init_lm=exp/lm/epoch-$lm_epochs.pt
  if should_run 4 lm; then
    (
      OMP_NUM_THREADS=1 mtp-asr pretrain-lm -c "$conf/lm.yaml" --exp-dir exp/lm \
        --set "data.tokenizer=$lang/tokenizer.model" --set "num_epochs=$lm_epochs"
      mark_done lm
    ) &
    pids+=($!)
  fi
fi
init_encoder=""
if [ "$ctc_epochs" -gt 0 ]; then
  init_encoder=exp/ctc/epoch-$ctc_epochs.pt
  if should_run 5 ctc; then
    ctc_train=(train -c "$conf/train.yaml" --ctc-only --exp-dir exp/ctc --set "data.tokenizer=$lang/tokenizer.model"
      --set "num_epochs=$ctc_epochs" --set optim.lr=3e-3 ${ctc_args[@]+"${ctc_args[@]}"})
    (
      if [ ${#pids[@]} -gt 0 ]; then OMP_NUM_THREADS=1 mtp-asr "${ctc_train[@]}"; else train_on_cores "${ctc_train[@]}"; fi
      mark_done ctc
    ) &
    pids+=($!)
  fi
fi
for pid in ${pids[@]+"${pids[@]}"}; do
  wait "$pid"  # set -e: a failed stage stops the recipe here
done

if should_run 6 asr; then
  train_on_cores train -c "$conf/train.yaml" --exp-dir exp/asr --set "data.tokenizer=$lang/tokenizer.model" \
    --set "num_epochs=$asr_epochs" --set "init_lm=$init_lm" --set "init_encoder=$init_encoder" \
    ${ctc_args[@]+"${ctc_args[@]}"}
  mark_done asr
fi

averaged=exp/asr/avg-epoch-$asr_epochs-avg-$avg.pt
if should_run 7 average; then
  mtp-asr average --exp-dir exp/asr --epoch "$asr_epochs" --avg "$avg" --out "$averaged"
  mark_done average
fi

model=$averaged
if [ "$distill_steps" -gt 0 ]; then
  model=${averaged%.pt}-distilled.pt
  if should_run 8 distill; then
    mtp-asr distill-heads --checkpoint "$averaged" --cuts data/fbank/cuts_train.jsonl.gz --out "$model" \
      --steps "$distill_steps" --max-cuts "$distill_cuts" --batch-size 32 --device "$device"
    mark_done distill
  fi
fi

decode_sets=$test_sets
lex_args=()
if [ "$lexicon" = true ]; then lex_args=(--lexicon "$lang/words.txt"); fi

if should_run 9 decode; then
  threshold_args=()
  for t in $thresholds; do threshold_args+=(--threshold "$t"); done
  # ctc-verify checks 8 draft tokens per call here: on a CPU the fastest in wall-clock (32 take 20% fewer calls but
  # each costs more; RESULTS.md). The tree run below spends positions for calls.
  decode_all "$model" exp/asr/decode "greedy mtp-threshold mtp-verify ctc-verify ctc-rescore" \
    "${threshold_args[@]}" --max-draft 8 ${lex_args[@]+"${lex_args[@]}"}
  if [ "$lexicon" = true ]; then decode_all "$model" exp/asr/decode greedy; fi  # the same model without it
  # The encoder's CTC head alone, what the LLM decoder adds to it: best path, and with the lexicon a beam search.
  decode_all "$model" exp/asr/decode ctc --ctc-beam-size 1
  if [ "$lexicon" = true ]; then decode_all "$model" exp/asr/decode ctc ${lex_args[@]+"${lex_args[@]}"}; fi
  if [ "$draft_tree_nodes" -gt 0 ]; then
    decode_fitted_tree "$model" exp/asr/decode "$draft_tree_nodes" dev mtp-verify ${lex_args[@]+"${lex_args[@]}"}
    # ctc-verify with the tree, up to 32 draft tokens per call (the default), and the CTC draft verified from both
    # readings of each correction (a wrong token or a missing one): dev 1436 calls with 8 draft tokens, 1208 with 16,
    # 1101 with 32, 1078 with 64 (greedy 8350), for more positions per call.
    tree=$(cat "exp/asr/decode/draft-tree-$draft_tree_nodes.txt")
    decode_all "$model" exp/asr/decode ctc-verify --draft-tree "$tree" \
      --max-draft 32 --draft-branches 2 ${lex_args[@]+"${lex_args[@]}"}
  fi
  mark_done decode
fi

if should_run 10 beam; then
  decode_all "$model" exp/asr/decode "beam mtp-beam mtp-beam-verify" --beam-size "$beam_size" \
    --threshold "$beam_threshold" \
    ${lex_args[@]+"${lex_args[@]}"}
  # Joint decoding: every extension scored by the decoder, the CTC head's prefix score and the word LM.
  joint_args=()
  if [ "$joint_ctc_weight" != 0 ]; then joint_args+=(--ctc-weight "$joint_ctc_weight"); fi
  if [ "$word_lm_order" -gt 0 ] && [ "$lexicon" = true ]; then  # the LM scores words: the lexicon's
    joint_args+=(--word-lm "$word_lm" --lm-weight "$lm_weight")
  fi
  if [ ${#joint_args[@]} -gt 0 ]; then
    decode_all "$model" exp/asr/decode "beam mtp-beam-verify" --beam-size "$beam_size" "${joint_args[@]}" \
      ${lex_args[@]+"${lex_args[@]}"}
  fi
  mark_done beam
fi

if should_run 11 mwer; then
  mtp-asr mwer -c "$conf/mwer.yaml" --init "$model" --exp-dir exp/mwer --set "max_steps=$mwer_steps" \
    --set "beam_size=$beam_size" --set "threshold=$beam_threshold"
  mark_done mwer
fi

if should_run 12 mwer_decode; then
  mwer_model=$(python -c "from mtp_asr.train.checkpoint import latest_checkpoint as l; print(l('exp/mwer'))")
  decode_all "$mwer_model" exp/mwer/decode "greedy mtp-verify" ${lex_args[@]+"${lex_args[@]}"}
  decode_all "$mwer_model" exp/mwer/decode mtp-beam --beam-size "$beam_size" --threshold "$beam_threshold" \
    ${lex_args[@]+"${lex_args[@]}"}
  mark_done mwer_decode
fi

if [ "$stage" -le 13 ] && [ "$stop_stage" -ge 13 ]; then
  log "stage 13: results table"
  mtp-asr summarize exp/asr/decode exp/mwer/decode --out exp/summary.json
fi
