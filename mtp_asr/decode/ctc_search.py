"""The CTC head's transcript: best path, or a prefix beam search, optionally over a lexicon's words only.

Best path (argmax per frame, repeats merged, blanks removed) is free but spells poorly: a character CTC head on
25 frames per second writes "HART DESE" for "HEART DISEASE". A prefix beam search sums each label sequence's
probability over its alignments and keeps the `beam` most probable prefixes per frame; with a lexicon (the automaton
of `mtp_asr.decode.lexicon`), a prefix may only grow by the tokens its lexicon state allows, and only prefixes that
end at a word boundary are complete, so every transcript is made of known words -- Kaldi's and icefall's
closed-vocabulary CTC decoding, without an n-gram LM. On the demo's dev set the CTC head alone goes from 40.2%
(best path) to 19.3% WER with the lexicon and 16 prefixes (egs/synth/asr/RESULTS.md).

The search keeps, per prefix, the log-probabilities of its alignments ending in blank and ending in its last label
(the standard split that lets "AA" be told from "A"), both float64 sums over frames. Per frame it extends prefixes
only by tokens within `token_prune` of the frame's best (always including blank): CTC posteriors are peaky, so most
frames offer one or two tokens and the search costs a few milliseconds per utterance.
"""
import heapq
import math
from typing import Optional

import numpy as np
import torch

from mtp_asr.decode.lexicon import DEAD, Lexicon

NEG_INF = -math.inf


def ctc_greedy(log_probs: torch.Tensor, lens: torch.Tensor, blank: int) -> list:
    """Best-path CTC decoding: argmax per frame, repeats merged, blanks removed; one token list per row."""
    best = log_probs.argmax(-1).cpu()
    out = []
    for row, n in zip(best, lens.tolist()):
        seq = torch.unique_consecutive(row[:n])
        out.append([t for t in seq.tolist() if t != blank])
    return out


def _logaddexp(a: float, b: float) -> float:
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


def ctc_prefix_beam_search(log_probs: np.ndarray, blank: int, beam: int, lexicon: Optional[Lexicon] = None,
                           token_prune: float = 8.0) -> list:
    """The most probable label sequence of one utterance's (T, V+1) CTC log-probabilities among those the search
    keeps (exact when `beam` covers every prefix); with `lexicon`, the most probable sequence of its words."""
    return ctc_nbest(log_probs, blank, beam, lexicon, token_prune)[0]


def ctc_nbest(log_probs: np.ndarray, blank: int, beam: int, lexicon: Optional[Lexicon] = None,
              token_prune: float = 8.0) -> list:
    """The label sequences the prefix beam search ends with, most probable first (with `lexicon`, those that end
    at a word boundary; when none does, the best one's complete words alone)."""
    if beam < 1:
        raise ValueError(f"the CTC beam must be >= 1 (got {beam})")
    moves = {}  # lexicon state -> {token: next state} for the tokens it allows (EOS aside: CTC does not emit it)

    def next_states(state: int) -> Optional[dict]:
        if lexicon is None:
            return None
        if state not in moves:
            moves[state] = {t: lexicon.step(state, t) for t in lexicon.allowed(state) if t != lexicon.eos_id}
        return moves[state]

    # prefix -> [log p(alignments ending in blank), log p(alignments ending in its last label), lexicon state]
    hyps = {(): [0.0, NEG_INF, Lexicon.start]}
    for row in np.asarray(log_probs, dtype=np.float64):
        values = row.tolist()
        tokens = [(c, values[c]) for c in np.flatnonzero(row >= row.max() - token_prune).tolist() if c != blank]
        p_blank = values[blank]
        new = {}
        for prefix, (lp_b, lp_l, state) in hyps.items():
            total = _logaddexp(lp_b, lp_l)
            _add(new, prefix, total + p_blank, NEG_INF, state)
            last = prefix[-1] if prefix else None
            allowed = next_states(state)
            for c, lp_c in tokens:
                if c == last:
                    _add(new, prefix, NEG_INF, lp_l + lp_c, state)  # the same label again, no blank between
                    from_blank = lp_b + lp_c  # a new label only after a blank
                else:
                    from_blank = total + lp_c
                if allowed is None:
                    nxt = state
                elif c in allowed:
                    nxt = allowed[c]
                else:  # not a way to spell the lexicon's words
                    continue
                if from_blank != NEG_INF:
                    _add(new, prefix + (c,), NEG_INF, from_blank, nxt)
        if len(new) > beam:
            new = dict(heapq.nlargest(beam, new.items(), key=lambda kv: _logaddexp(kv[1][0], kv[1][1])))
        hyps = new

    ranked = sorted(hyps.items(), key=lambda kv: -_logaddexp(kv[1][0], kv[1][1]))
    if lexicon is None:
        return [list(p) for p, _ in ranked]
    complete = [list(p) for p, v in ranked if _at_word_end(lexicon, v[2])]
    return complete or [_complete_words(lexicon, ranked[0][0])]


def _add(hyps: dict, prefix: tuple, lp_blank: float, lp_label: float, state: int) -> None:
    entry = hyps.get(prefix)
    if entry is None:
        hyps[prefix] = [lp_blank, lp_label, state]
    else:
        entry[0] = _logaddexp(entry[0], lp_blank)
        entry[1] = _logaddexp(entry[1], lp_label)


def _at_word_end(lexicon: Lexicon, state: int) -> bool:
    return lexicon.final[state] or state == Lexicon.start


def _complete_words(lexicon: Lexicon, tokens) -> list:
    state, end = Lexicon.start, 0
    for i, tok in enumerate(tokens, 1):
        state = lexicon.step(state, tok)
        if _at_word_end(lexicon, state):
            end = i
    return list(tokens[:end])

def ctc_transcripts(log_probs: torch.Tensor, lens: torch.Tensor, blank: int, beam: int = 1,
                    lexicon: Optional[Lexicon] = None) -> list:
    """One token list per row of (B, T, V+1) log-probabilities: best path for `beam` 1 without a lexicon, else
    `ctc_prefix_beam_search`."""
    if beam == 1 and lexicon is None:
        return ctc_greedy(log_probs, lens, blank)
    rows = log_probs.float().cpu().numpy()
    return [ctc_prefix_beam_search(rows[i, :n], blank, beam, lexicon) for i, n in enumerate(lens.tolist())]

