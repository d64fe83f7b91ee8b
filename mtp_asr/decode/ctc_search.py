"""The CTC head's transcript: best path, or a prefix beam search, optionally over a lexicon's words only.

Best path (argmax per frame, repeats merged, blanks removed) is free but spells poorly: a character CTC head on
25 frames per second writes "HART DESE" for "HEART DISEASE". A prefix beam search sums each label sequence's
probability over its alignments and keeps the `beam` most probable prefixes per frame; with a lexicon (the automaton
of `mtp_asr.decode.lexicon`), a prefix may only grow by the tokens its lexicon state allows, and only prefixes that
end at a word boundary are complete, so every transcript is made of known words -- Kaldi's and icefall's
closed-vocabulary CTC decoding, without an n-gram LM. On the demo's dev set the CTC head alone goes from 40.2%
(best path) to 19.3% WER with the lexicon and 16 prefixes (egs/synth/asr/RESULTS.md).

The search keeps, per prefix, the probabilities of its alignments ending in blank and ending in its last label (the
standard split that lets "AA" be told from "A"), in float64, rescaled after each frame. Per frame it extends prefixes
only by tokens within `token_prune` nats of the frame's best (blank always stays): CTC posteriors are peaky, so a
frame offers a handful of tokens (6.7 on the demo's dev set) and the search costs a few milliseconds per utterance
in Python.
"""
import heapq
from typing import Optional

import numpy as np
import torch

from mtp_asr.decode.lexicon import Lexicon


def ctc_greedy(log_probs: torch.Tensor, lens: torch.Tensor, blank: int) -> list:
    """Best-path CTC decoding: argmax per frame, repeats merged, blanks removed; one token list per row."""
    best = log_probs.argmax(-1).cpu()
    out = []
    for row, n in zip(best, lens.tolist()):
        seq = torch.unique_consecutive(row[:n])
        out.append([t for t in seq.tolist() if t != blank])
    return out


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

    log_probs = np.asarray(log_probs, dtype=np.float64)
    keep = log_probs >= log_probs.max(-1, keepdims=True) - token_prune
    # prefix -> [p(alignments ending in blank), p(alignments ending in its last label), lexicon state]: plain
    # probabilities, rescaled after every frame so that the best prefix's is 1 (sums and products instead of
    # log-additions, and no underflow over long utterances)
    hyps = {(): [1.0, 0.0, Lexicon.start]}
    for row, mask in zip(np.exp(log_probs), keep):
        values = row.tolist()
        tokens = [(c, values[c]) for c in np.flatnonzero(mask).tolist() if c != blank]
        p_blank = values[blank]
        new = {}
        for prefix, (p_b, p_l, state) in hyps.items():
            total = p_b + p_l
            entry = new.get(prefix)
            if entry is None:
                entry = new[prefix] = [total * p_blank, 0.0, state]
            else:
                entry[0] += total * p_blank
            last = prefix[-1] if prefix else None
            allowed = next_states(state)
            for c, p_c in tokens:
                if c == last:
                    entry[1] += p_l * p_c  # the same label again, no blank between
                    grown = p_b * p_c  # a new label only after a blank
                else:
                    grown = total * p_c
                nxt = state if allowed is None else allowed.get(c)
                if nxt is None or grown == 0.0:  # None: not a way to spell the lexicon's words
                    continue
                longer = prefix + (c,)
                other = new.get(longer)
                if other is None:
                    new[longer] = [0.0, grown, nxt]
                else:
                    other[1] += grown
        if len(new) > beam:
            new = dict(heapq.nlargest(beam, new.items(), key=_total))
        scale = max(map(_total, new.items()))
        if scale > 0:
            for entry in new.values():
                entry[0] /= scale
                entry[1] /= scale
        hyps = new

    ranked = sorted(hyps.items(), key=_total, reverse=True)
    if lexicon is None:
        return [list(p) for p, _ in ranked]
    complete = [list(p) for p, v in ranked if _at_word_end(lexicon, v[2])]
    return complete or [_complete_words(lexicon, ranked[0][0])]


def _total(item) -> float:
    return item[1][0] + item[1][1]


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

