"""`mtp-beam-verify` (beyond the paper): next-token beam search that advances along verified drafts.

`mtp-beam` scores a hypothesis' tail with heads 2..K and commits to it, so a confident but wrong tail is never
revisited. Here tails are drafts, as in `mtp-verify`: each hypothesis feeds its new token and the heads' drafts
after it; the call computes head 1 at every fed position, so the drafts that head 1 agrees with (its argmax, one
after another) are kept with head 1's exact log-probabilities, and every kept position is also a branching point:
head 1's other top-B tokens there become candidates of their own. Every score is head 1's, so this is a beam search
over the next-token model's scores (the N-best lists are scored like `beam`'s), which moves several tokens per call
along each hypothesis' greedy continuation. Candidates of different lengths compete in one pool, ranked by
`score / n ** length_norm` as in `beam`.

Reductions (tests/test_verify_beam.py): with one head it is `beam`; with beam size 1 it emits `greedy`'s tokens
with `mtp-verify`'s decoder calls.

With a CTC prefix scorer it is joint CTC/attention decoding (`mtp_asr.decode.beam`'s): at every fed position the
decoder's pre-beam tokens get joint scores, extending the CTC prefix along the drafts, and a draft is kept where it
is the joint score's best token. With one head it is joint `beam` (tests/test_joint_ctc.py). Demo dev, B=4, w=0.5:
15.48% WER with 2686 decoder calls, joint beam 14.27% with 8590 (length_norm 1: 15.14%; B=8: 14.73% with 2837
calls): the drafted search compares hypotheses of different lengths in one pool and explores differently; it finds
a better joint score than joint beam as often as a worse one (egs/synth/asr/RESULTS.md). A word LM's charges
(`mtp_asr.decode.word_lm`) join the joint scores the same way, the LM history following the best token per depth.
"""
from typing import Optional

import torch
from torch import Tensor

from mtp_asr.decode.beam import (BeamOutput, _Partial, _extend, _log_softmax, _pad, _prune, _public, check_search,
                                  check_word_lm, joint_scores)
from mtp_asr.decode.ctc_prefix import CTCPrefixScorer, CTCPrefixState
from mtp_asr.decode.generate import Hypothesis
from mtp_asr.decode.lexicon import DEAD, Lexicon
from mtp_asr.decode.word_lm import WordLM
from mtp_asr.model.lm import MTPLanguageModel


@torch.inference_mode()
def verify_beam_search(lm: MTPLanguageModel, prefix: Tensor, prefix_lens: Tensor, num_heads: Optional[int] = None,
                       max_new_tokens=200, beam_size: int = 4, nbest: Optional[int] = None,
                       length_norm: float = 0.5, lexicon: Optional[Lexicon] = None,
                       ctc: Optional[CTCPrefixScorer] = None, ctc_weight: float = 0.0,
                       word_lm: Optional[WordLM] = None) -> BeamOutput:
    """Beam-search every row of `prefix` (B, P, dim) with drafts of heads 2..num_heads verified by head 1. Options
    as in `mtp_asr.decode.beam.beam_search`; with `ctc` or `word_lm`, joint scores throughout (a draft is kept
    where it is the joint score's best token)."""
    check_word_lm(word_lm, lexicon)
    K = num_heads or lm.num_heads
    n_utts, device = prefix.shape[0], prefix.device
    nbest, limits = check_search(lm, K, beam_size, nbest, length_norm, n_utts, max_new_tokens)

    cache = lm.new_cache(n_utts, int(prefix_lens.max()) + max(limits) + 2 * K + 1, prefix_lens, dtype=prefix.dtype)
    eos, vocab = lm.eos_id, lm.decoder.cfg.vocab_size
    folded = lm.heads.fold(lm.decoder) if K > 1 else None
    utt_of = list(range(n_utts))
    live = [_Partial((), (), (), (), 0.0, 0.0, row=r, words=word_lm.start if word_lm else ()) for r in range(n_utts)]
    ctc_state = ctc.initial() if ctc is not None else None
    drafts = [[] for _ in range(n_utts)]  # per live hypothesis: the heads' drafts fed after its pending tokens
    kept = [[] for _ in range(n_utts)]
    calls = [0] * n_utts
    batch_calls = 0
    block, n_real = prefix, prefix_lens.to(device)
    while live:
        x = block if block.dim() == 3 else lm.embed(block)
        geometry = cache.call_geometry(x.shape[1])
        states = lm.heads.states(lm.decoder, lm.decoder(x, cache, geometry), cache, geometry, lazy=True)
        batch_calls += 1
        depth = max(len(d) for d in drafts) + 1  # head 1 at the last real position and after every draft
        rows = torch.arange(len(live), device=device)
        cols = ((n_real - 1)[:, None] + torch.arange(depth, device=device)).clamp(max=x.shape[1] - 1)
        logits = lm.heads.logits(lm.decoder, 0, states[0][rows[:, None], cols])  # (live, depth, V)
        if lexicon:
            logits = lexicon.constrain(logits, _path_states(lexicon, live, drafts, depth))
        logp = _log_softmax(logits)
        if ctc is None and word_lm is None:
            top_lp, top_tok = logp.topk(min(beam_size, vocab), dim=-1)
            head1 = logits.argmax(-1).tolist()
            # head 1's log-probability of each draft, from the position before it (padding reads token 0, unused)
            fed, _ = _pad([d + [0] for d in drafts], device)
            draft_lp = logp.gather(-1, fed[:, : depth, None])[..., 0].tolist()
            top_lp, top_tok = top_lp.tolist(), top_tok.tolist()
        else:
            top_lp, top_tok, ctc_rows, ctc_next = _joint_depths(logp, beam_size, ctc, ctc_state, ctc_weight, word_lm,
                                                                live)
            # a draft is kept where it is the joint score's best token, with that token's joint score
            head1 = [[toks[0] for toks in row] for row in top_tok]
            draft_lp = [[lps[0] for lps in row] for row in top_lp]
        base = (cache.lengths + n_real).tolist()

        candidates = {}  # utterance -> candidates
        for i, (hyp, u) in enumerate(zip(live, utt_of)):
            d = drafts[i]
            room = limits[u] - len(hyp.tokens) - 1  # drafts that can be kept and still leave room for one token
            accepted = 0
            while accepted < min(len(d), room) and d[accepted] == head1[i][accepted] and d[accepted] != eos:
                accepted += 1
            out = candidates.setdefault(u, [])
            for a in range(accepted + 1):
                kept_drafts = list(zip(d[:a], draft_lp[i][:a]))
                for c, (tok, lp) in enumerate(zip(top_tok[i][a], top_lp[i][a])):
                    if lp == float("-inf") or (a < accepted and tok == d[a]):  # the draft continues one deeper
                        continue
                    cand = _extend(hyp, i, kept_drafts + [(tok, lp)], eos, limits[u], length_norm, next_token=True)
                    cand.pending = cand.pending[-1:]  # the kept drafts are in the cache already
                    if word_lm:
                        cand.words = word_lm.advance(hyp.words, hyp.lex, cand.tokens[len(hyp.tokens):])
                    if lexicon:
                        cand.lex = lexicon.advance(hyp.lex, cand.tokens[len(hyp.tokens):])
                    cand.cached = base[i] + a  # its real tokens and the drafts it kept
                    if ctc is not None:
                        cand.ctc = ctc_rows[i][a][c]
                    out.append(cand)
        next_live, next_utt = _prune(candidates, kept, calls, beam_size)
        if not next_live:
            break
        parent = torch.tensor([h.row for h in next_live], device=device)
        new_tok = torch.tensor([h.pending[-1] for h in next_live], device=device)
        # Heads 2..K at the position each survivor's new token was chosen from: its drafts for the next call.
        lengths = torch.tensor([h.cached for h in next_live], device=device, dtype=cache.lengths.dtype)
        next_drafts = [[] for _ in next_live]
        if K > 1:
            # The column of this call's block the new token was chosen at: the survivor's cache length, less one,
            # less its parent row's length before the call.
            index = (parent, lengths - 1 - cache.lengths[parent])
            constrain = lexicon.chain_constraint([h.lex for h in next_live]) if lexicon else None
            extra = lm.heads.logits_at(lm.decoder, states, index, range(1, K), new_tok, constrain, folded)
            next_drafts = extra.argmax(-1).tolist()
        cache.select(parent)
        cache.lengths = lengths
        if ctc is not None:
            ctc_state = ctc_next.select(torch.tensor([h.ctc for h in next_live], device=ctc_next.utt.device))
        live, utt_of, drafts = next_live, next_utt, next_drafts
        block, _ = _pad([list(h.pending) + d for h, d in zip(live, drafts)], device)
        n_real = torch.ones(len(live), dtype=torch.long, device=device)

    nbest_lists = [[_public(h) for h in kept[u][:nbest]] for u in range(n_utts)]
    hyps = [Hypothesis(hs[0].tokens, calls[u], hs[0].finished) for u, hs in enumerate(nbest_lists)]
    return BeamOutput(nbest_lists, hyps, batch_calls)


def _joint_depths(logp: Tensor, beam_size: int, ctc: Optional[CTCPrefixScorer], state: Optional[CTCPrefixState],
                  weight: float, word_lm: Optional[WordLM], live: list) -> tuple:
    """Joint scores at every depth of the fed drafts, `logp` (H, depth, V) being head 1's there. Depth a extends the
    prefix the joint scores chose at depths before it: where the draft was that choice, the draft's prefix, and only
    then are depth a's candidates used. Returns, as lists per hypothesis and depth: the beam_size best joint scores
    and tokens, best first, and the candidates' rows in the returned CTC states (None without `ctc`)."""
    H, depth = logp.shape[:2]
    top_lp, top_tok, rows, states = [], [], [], []
    offset, index = 0, torch.arange(H, device=logp.device)
    histories, lex_states = [h.words for h in live], [h.lex for h in live]
    for a in range(depth):
        joint, pre_tok, extended = joint_scores(logp[:, a], beam_size, ctc, state, weight, word_lm, histories,
                                                lex_states)
        lp, col = joint.topk(min(beam_size, joint.shape[1]), dim=-1)
        tokens = pre_tok.gather(1, col).tolist()
        top_lp.append(lp.tolist())
        top_tok.append(tokens)
        rows.append((offset + index[:, None] * joint.shape[1] + col).tolist())
        if ctc is not None:
            states.append(extended)
            offset += H * joint.shape[1]
            state = extended.select(index * joint.shape[1] + col[:, 0])  # the prefix grown by the best token
        if word_lm is not None:
            best = [toks[0] for toks in tokens]
            histories = [word_lm.advance(h, s, [t]) for h, s, t in zip(histories, lex_states, best)]
            lex_states = [word_lm.lexicon.step(s, t) for s, t in zip(lex_states, best)]
    per_hyp = [[list(x) for x in zip(*lists)] for lists in (top_lp, top_tok, rows)]
    return (*per_hyp, CTCPrefixState.cat(states) if states else None)


def _path_states(lexicon: Lexicon, live: list, drafts: list, depth: int) -> list:
    """Lexicon states at each hypothesis' last real position and after each of its drafts, padded to depth."""
    out = []
    for h, d in zip(live, drafts):
        row = [h.lex]
        for tok in d:
            row.append(lexicon.step(row[-1], tok))
        out += row + [DEAD] * (depth - len(row))
    return out
