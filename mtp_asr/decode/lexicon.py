"""Lexicon-constrained decoding: transcripts made of known words only.

A character (or BPE) decoder spells every word itself, and most of a weak model's word errors are near-misses of
spelling or word boundaries ("HAVETO", "INTRESTING"). A closed-vocabulary system (Kaldi's lexicon, icefall's HLG
graph) never emits such words. Here the lexicon is a prefix tree over the decoder's token ids: a state is a node of
the tree, and the tokens allowed in it are its children, plus, where a word ends (or nothing was emitted yet), the
first tokens of every word and EOS. Decoding masks head 1's logits (and the heads' whose tokens are emitted) to the
allowed tokens, so the probabilities are renormalised over them; verification checks drafts against the constrained
head 1, so `mtp-verify` stays identical to constrained `greedy`.

Words are tokenised one at a time (`tokenizer.encode(word)`): sentencepiece splits text at spaces and a word's first
piece carries the word-boundary mark, so a transcript's tokens are its words' tokens one after another, and a
word-start token never continues a word. Only that (canonical) segmentation of each word is allowed.
"""
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor

from mtp_asr.text import normalize_text

DEAD = -1  # the state after a token the lexicon does not allow; everything is allowed there (see `mask`)


class Lexicon:
    """A prefix tree of the words' token sequences, as a deterministic automaton over token ids."""

    start = 0

    def __init__(self, words: Iterable[str], tokenizer, name: str = "<lexicon>"):
        self.name = str(name)
        self.vocab_size, self.eos_id = tokenizer.vocab_size, tokenizer.eos_id
        self.children = [{}]  # node -> {token: node}
        self.final = [False]
        self.words = sorted({w for line in words for w in normalize_text(line).split()})
        if not self.words:
            raise ValueError(f"lexicon {self.name} holds no words")
        # Built in the order of the words' token sequences, so that the words below any node are consecutive in
        # `spelled_words`: node n spans spelled_words[first[n]:last[n]] (a word LM's look-ahead sums over them).
        spelled = sorted((tuple(tokenizer.encode(word)), word) for word in self.words)
        self.spelled_words = [word for _, word in spelled]
        self.first, self.last, self.word_id = [0], [len(spelled)], [-1]  # word_id: the word a final node ends
        for i, (tokens, word) in enumerate(spelled):
            node = self.start
            for tok in tokens:
                nxt = self.children[node].get(tok)
                if nxt is None:
                    nxt = len(self.children)
                    self.children[node][tok] = nxt
                    self.children.append({})
                    self.final.append(False)
                    self.first.append(i)
                    self.last.append(i + 1)
                    self.word_id.append(-1)
                self.last[nxt] = i + 1
                node = nxt
            self.final[node] = True
            self.word_id[node] = i
        # A word-start token (a child of the root) must never continue a word, or a state would be ambiguous.
        starts = set(self.children[self.start])
        for tokens, word in spelled:
            node = self.start
            for tok in tokens:
                node = self.children[node][tok]
                if starts & set(self.children[node]):
                    raise ValueError(f"lexicon {self.name}: the tokenizer splits words so that a word-start token "
                                     f"continues {word!r}; it must mark word boundaries in the first piece "
                                     f"(sentencepiece does)")
        self._masks = {}  # state -> its mask row, for the states decoding visits
        self.max_cached_masks = max(1024, 2 ** 26 // self.vocab_size)  # at most 64 MB of rows

    @classmethod
    def from_file(cls, path, tokenizer) -> "Lexicon":
        """Words from a text file: the first field of each line (a plain word list, or Kaldi's words.txt); entries
        such as <eps>, <unk> and #0 are skipped."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"lexicon {path} does not exist (--lexicon)")
        lines = path.read_text(encoding="utf-8").splitlines()
        words = [ln.split()[0] for ln in lines if ln.strip() and not ln.split()[0].startswith(("<", "#"))]
        return cls(words, tokenizer, name=path)

    def __len__(self) -> int:
        return len(self.words)

    @property
    def num_states(self) -> int:
        return len(self.children)

    def step(self, state: int, token: int) -> int:
        if state == DEAD:
            return DEAD
        nxt = self.children[state].get(token)
        if nxt is not None:
            return nxt
        if self.final[state] or state == self.start:
            return self.children[self.start].get(token, DEAD)
        return DEAD

    def advance(self, state: int, tokens: Sequence[int]) -> int:
        for tok in tokens:
            state = self.step(state, tok)
        return state

    def allowed(self, state: int) -> list:
        if state == DEAD:
            return list(range(self.vocab_size))
        out = list(self.children[state])
        if self.final[state] or state == self.start:
            out += list(self.children[self.start]) + [self.eos_id]
        return sorted(set(out))

    def mask(self, states: Sequence[int], device=None) -> Tensor:
        """(len(states), V) booleans: the tokens allowed in each state. The dead state (reached only by a draft the
        lexicon rejects, which the constrained head 1 never accepts) allows everything: its positions are never
        used, and a row of -inf would give NaN probabilities."""
        rows = []
        for s in states:
            row = self._masks.get(s)
            if row is None:
                if len(self._masks) >= self.max_cached_masks:  # a large lexicon over a large vocabulary
                    self._masks.clear()
                row = torch.zeros(self.vocab_size, dtype=torch.bool)
                row[self.allowed(s)] = True
                self._masks[s] = row
            rows.append(row)
        return torch.stack(rows).to(device) if rows else torch.zeros(0, self.vocab_size, dtype=torch.bool)

    def constrain(self, logits: Tensor, states: Sequence[int]) -> Tensor:
        """logits (..., V) with the disallowed tokens of each row's state at -inf (states: one per row of
        logits.reshape(-1, V))."""
        mask = self.mask(states, logits.device).view(logits.shape)
        return logits.masked_fill(~mask, float("-inf"))

    def chain_constraint(self, states: list):
        """A `constrain` for `MTPHeads.logits_at`, whose heads run in order: each head's logits masked to what the
        lexicon allows after the tokens chosen before it; `states` (one per row, updated in place) follow the
        chosen (argmax) tokens."""
        def constrain(logits: Tensor) -> Tensor:
            logits = self.constrain(logits, states)
            states[:] = [self.step(s, t) for s, t in zip(states, logits.argmax(-1).tolist())]
            return logits
        return constrain
