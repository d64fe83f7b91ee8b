"""Word n-gram LM fusion for the beam searches (shallow fusion), with look-ahead through the lexicon's prefix tree.

The decoder spells words token by token; a word LM (`mtp_asr.ngram`) knows words only. Scoring a word when its last
token is emitted would let a hypothesis in the middle of a word outrank one that has just paid for its word, and
the search would favour long words and postpone word ends. Look-ahead (Hori et al., 2018, "End-to-end speech
recognition with word-based RNN language models") charges a hypothesis inside a word

    LA(h, s) = log sum over the words w below lexicon state s of P(w | h)

(h: the words before it), each token the change of LA, and the token that ends the word (the next word's first
token, or EOS) log P(w | h) - LA(h, s): the charges telescope, so a finished hypothesis has been charged exactly
log P(w_1 .. w_n </s>), and a partial one the probability of the words it can still become. The lexicon's words are
laid out so that every state's words are consecutive (`Lexicon.spelled_words`), so LA is a difference of two
cumulative sums of one distribution per history, computed once per history (`mtp_asr.ngram.WordVectors`) and
cached.

A search adds weight x this charge to each token's score, beside the decoder's (and the CTC head's) scores.
"""
import math
from typing import Sequence, Tuple

import numpy as np

from mtp_asr.decode.lexicon import Lexicon
from mtp_asr.ngram import BOS, EOS, NgramLM, WordVectors

_FLOOR = -100.0  # log-probability of a lexicon word the LM cannot predict (no <unk>): improbable, not impossible
_EXACT_SPAN = 16  # spans of at most this many words are summed directly (a difference of cumulative sums would
# lose the small probabilities' digits)


class WordLM:
    """An n-gram LM over a lexicon's words, as per-token charges. A hypothesis' LM state is its history: the last
    order - 1 words, <s> first."""

    def __init__(self, ngram: NgramLM, lexicon: Lexicon, weight: float):
        if weight < 0:
            raise ValueError(f"the word LM weight must be >= 0 (got {weight})")
        self.ngram, self.lexicon, self.weight = ngram, lexicon, weight
        self.vectors = WordVectors(ngram, lexicon.spelled_words)
        self.start = self._extend((), BOS)
        # history -> (log P(w | history) in spelled order, cumulative P, log P(</s> | history), {state: LA})
        self._tables = {}
        # about 32 MB of tables, and at least 64 (a large lexicon's tables are larger)
        self.max_cached = max(64, 2 ** 25 // (16 * len(lexicon.spelled_words)))

    def _table(self, history: tuple):
        table = self._tables.get(history)
        if table is None:
            if len(self._tables) >= self.max_cached:
                self._tables.clear()
            logp = np.maximum(self.vectors(history), _FLOOR)
            cumulative = np.concatenate([[0.0], np.cumsum(np.exp(logp))])
            table = self._tables[history] = (logp, cumulative, self.ngram.logprob(history, EOS), {})
        return table

    def _lookahead(self, history: tuple, state: int) -> float:
        if state == Lexicon.start:
            return 0.0
        logp, cumulative, _, known = self._table(history)
        value = known.get(state)
        if value is None:
            lo, hi = self.lexicon.first[state], self.lexicon.last[state]
            if hi - lo <= _EXACT_SPAN:
                span = logp[lo:hi]
                top = span.max()
                value = float(top + math.log(np.exp(span - top).sum()))
            else:
                value = math.log(max(cumulative[hi] - cumulative[lo], 1e-300))
            known[state] = value
        return value

    def step(self, history: tuple, state: int, token: int) -> Tuple[float, tuple]:
        """The (unweighted) charge of `token` after a hypothesis with this history in lexicon `state`, and the
        history after it. Tokens the lexicon does not allow there (which constrained searches never score) cost 0."""
        lex = self.lexicon
        if state < 0:  # the dead state
            return 0.0, history
        nxt = lex.children[state].get(token)
        if nxt is not None:  # within the word
            return self._lookahead(history, nxt) - self._lookahead(history, state), history
        charge, words = 0.0, history
        if lex.final[state]:  # the word ends here
            logp = self._table(history)[0]
            word = lex.word_id[state]
            charge = float(logp[word]) - self._lookahead(history, state)
            words = self._extend(history, lex.spelled_words[word])
        elif state != Lexicon.start:
            return 0.0, history
        if token == lex.eos_id:
            return charge + self._table(words)[2], words
        first = lex.children[Lexicon.start].get(token)
        if first is None:
            return 0.0, history
        return charge + self._lookahead(words, first), words

    def _extend(self, history: tuple, word: str) -> tuple:
        keep = self.ngram.order - 1
        return (history + (word,))[-keep:] if keep else ()

    def charges(self, histories: Sequence[tuple], states: Sequence[int], tokens: Sequence[Sequence[int]]) -> list:
        """weight x the charge of each of tokens[i] after hypothesis i (one list per hypothesis)."""
        return [[self.weight * self.step(h, s, t)[0] for t in toks] for h, s, toks in zip(histories, states, tokens)]

    def advance(self, history: tuple, state: int, tokens: Sequence[int]) -> tuple:
        """The history after `tokens`, from lexicon `state`."""
        for tok in tokens:
            _, history = self.step(history, state, tok)
            state = self.lexicon.step(state, tok)
        return history
