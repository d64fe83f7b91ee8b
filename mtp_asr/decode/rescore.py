"""`ctc-rescore`: the CTC head proposes an N-best list, the LLM decoder scores all of it at once.

The two halves of the model err differently. The CTC head hears every frame but spells each one on its own; the
decoder writes fluent words but can drift from the audio ("YOU MONEY" for "HUMAN"). On the demo's dev set a prefix
beam search over the lexicon's words (`mtp_asr.decode.ctc_search`) already beats the decoder's greedy output (19.3%
vs 22.0% WER), and the right transcript is often in its N-best list when it is not on top (oracle 13.3% of 16).
So the decoder reads each hypothesis teacher-forced -- the prompt in one call, then all N hypotheses of an utterance
side by side in a second call on copies of the prompt's KV cache -- and the transcript is the hypothesis with the
best

    weight x log p_ctc(y | audio) + (1 - weight) x log p_decoder(y, EOS | audio),

both summed over the whole sequence (CTC over all alignments, torch's CTC loss; the decoder with head 1). Two decoder
calls per utterance instead of one per token: lossy like `mtp-threshold` (not greedy's output), and on the demo more
accurate than greedy (egs/synth/asr/RESULTS.md). Each of those calls is N times wider than a greedy step, so where
compute rather than call overhead bounds the decoder (a CPU at large batches) the calls saved buy less time. This is
N-best rescoring, the cheap half of ESPnet's joint CTC/attention decoding: the decoder cannot add a word the CTC list
lacks.
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mtp_asr.decode.ctc_search import ctc_nbest
from mtp_asr.decode.drafts import to_decoder_tokens
from mtp_asr.decode.generate import GenerateOutput, Hypothesis
from mtp_asr.model.lm import MTPLanguageModel


def ctc_sequence_log_probs(log_probs: Tensor, seqs: Sequence[Sequence[int]], blank: int) -> Tensor:
    """log p(seq | one utterance's (T, V+1) CTC log-probabilities), summed over alignments, for each sequence (-inf
    where one does not fit in T frames); computed in float32, or float64 for float64 input."""
    T = log_probs.shape[0]
    targets = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    log_probs = log_probs.cpu().to(torch.promote_types(log_probs.dtype, torch.float32))
    loss = F.ctc_loss(log_probs[:, None].expand(T, len(seqs), -1), targets,
                      torch.full((len(seqs),), T, dtype=torch.long),
                      torch.tensor([len(s) for s in seqs], dtype=torch.long), blank=blank, reduction="none")
    return -loss.double()


@torch.inference_mode()
def rescore_nbest(lm: MTPLanguageModel, prefix: Tensor, prefix_lens: Tensor, nbest: Sequence[Sequence[tuple]],
                  ctc_log_probs: Tensor, ctc_lens: Tensor, blank: int, weight: float,
                  max_new_tokens: Sequence[int]) -> GenerateOutput:
    """Per row, the hypothesis of `nbest[r]` -- (CTC tokens, decoder tokens) pairs, the same text in each model's
    tokens -- with the best combined score; one decoder call for the whole batch. Hypotheses longer than the row's
    length limit are dropped (the first one cut to the limit stands in when none is left)."""
    lists, cut = [], []
    for hyps, limit in zip(nbest, max_new_tokens):
        kept = [(c, d) for c, d in hyps if len(d) <= limit]
        cut.append(not kept)
        lists.append(kept or [(hyps[0][0], list(hyps[0][1][:limit]))])
    owner = [r for r, hyps in enumerate(lists) for _ in hyps]
    decoder = decoder_log_probs(lm, prefix, prefix_lens, owner, [d for hyps in lists for _, d in hyps])
    out, start = [], 0
    for r, hyps in enumerate(lists):
        ctc = ctc_sequence_log_probs(ctc_log_probs[r, : int(ctc_lens[r])], [c for c, _ in hyps], blank)
        total = weight * ctc + (1 - weight) * decoder[start: start + len(hyps)]
        out.append(Hypothesis(list(hyps[int(total.argmax())][1]), decoder_calls=2, finished=not cut[r]))
        start += len(hyps)
    return GenerateOutput(out, batch_calls=2)


def decoder_log_probs(lm: MTPLanguageModel, prefix: Tensor, prefix_lens: Tensor, owner: Sequence[int],
                      seqs: Sequence[Sequence[int]], chunk: int = 64) -> Tensor:
    """log p(seq, EOS | prompt of row owner[i]) under head 1, per sequence, in two decoder calls: the prompts once,
    then every sequence at once on copies of its prompt's KV cache rows (rather than each prompt once per
    hypothesis: the prompt is most of an utterance's positions)."""
    device, eos = prefix.device, lm.eos_id
    width = max(len(s) for s in seqs)
    cache = lm.new_cache(prefix.shape[0], int(prefix_lens.max()) + width + 1, prefix_lens, dtype=prefix.dtype)
    hidden = lm.decoder(prefix, cache, cache.call_geometry(prefix.shape[1]))
    cache.lengths += prefix_lens.to(device)
    last = hidden[torch.arange(prefix.shape[0], device=device), prefix_lens.to(device) - 1]
    first = _log_softmax(lm, last)  # (B, V): each prompt's first token
    owner_t = torch.tensor(list(owner), device=device)
    totals = first[owner_t, torch.tensor([s[0] if s else eos for s in seqs], device=device)].double()
    if width == 0:
        return totals.cpu()
    cache.select(owner_t)
    tokens = torch.tensor([list(s) + [eos] * (width - len(s)) for s in seqs], device=device)
    hidden = lm.decoder(lm.embed(tokens), cache, cache.call_geometry(width))
    # Position i predicts token i + 1 (EOS after the last); positions past that are padding.
    targets = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], eos)], 1)
    valid = torch.arange(width, device=device) < torch.tensor([len(s) for s in seqs], device=device)[:, None]
    for lo in range(0, len(seqs), chunk):  # the (rows, width, V) log-probabilities a chunk at a time
        logp = _log_softmax(lm, hidden[lo: lo + chunk]).gather(-1, targets[lo: lo + chunk, :, None])[..., 0]
        totals[lo: lo + chunk] += (logp.double() * valid[lo: lo + chunk]).sum(1)
    return totals.cpu()


def _log_softmax(lm: MTPLanguageModel, hidden: Tensor) -> Tensor:
    """Head 1's log-probabilities from trunk outputs (before the final norm)."""
    return lm.heads.logits(lm.decoder, 0, lm.decoder.norm(hidden)).float().log_softmax(-1)


def ctc_hypotheses(log_probs: Tensor, lens: Tensor, blank: int, beam: int, lexicon=None, ctc_tokenizer=None,
                   tokenizer=None) -> list:
    """Per row, the CTC prefix beam search's final hypotheses (`ctc_nbest`) as (CTC tokens, decoder tokens) pairs:
    the same tokens when the CTC head predicts the decoder's, else re-tokenised text."""
    rows = log_probs.float().cpu().numpy()
    out = []
    for i, n in enumerate(lens.tolist()):
        hyps = ctc_nbest(rows[i, :n], blank, beam, lexicon)
        out.append(list(zip(hyps, to_decoder_tokens(hyps, ctc_tokenizer, tokenizer))))
    return out
