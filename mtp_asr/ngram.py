"""Word n-gram language models in ARPA format: trained here (interpolated modified Kneser-Ney) or read from a file.

A Speech-LLaMA decoder learns its language model from the transcripts it is trained on; text without audio is
usually far more plentiful, and a word n-gram trained on it is the classic way to use it (Kaldi's G, icefall's
n-gram rescoring, ESPnet's word LM). `mtp-asr train-ngram` estimates one from a text file; any ARPA file (SRILM,
KenLM, the LibriSpeech LM's 3-gram) can be read instead. Decoding fuses it into the beam searches through
`mtp_asr.decode.word_lm`.

Estimation (Chen & Goodman 1998, as SRILM's `-interpolate -kndiscount` and KenLM's lmplz): the highest order uses
raw counts, lower orders continuation counts (the number of distinct words seen before an n-gram), except n-grams
that start with <s>, which nothing precedes; each order has three discounts (for counts 1, 2, 3+) from its
count-of-counts; every order is interpolated with the one below and the unigrams with a uniform distribution over
the vocabulary (<unk> included). In ARPA form an interpolated model stores, for each seen n-gram, its interpolated
probability and, for each context, its interpolation weight as the back-off weight, so reading the file back gives
the same probabilities.

Probabilities are natural logs in memory and log10 in the file, as ARPA has it.
"""
import gzip
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from mtp_asr.utils import atomic_path

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
LOG10 = math.log(10.0)
NO_PROB = -99.0  # ARPA's log10 probability of <s> (never predicted)


class NgramLM:
    """A back-off n-gram model: `prob[ngram]` (natural log) for the stored n-grams, `bow[context]` back-off
    weights (natural log, 0 where absent)."""

    def __init__(self, order: int, prob: Dict[tuple, float], bow: Dict[tuple, float], name: str = "<n-gram>"):
        if order < 1:
            raise ValueError(f"n-gram order must be >= 1 (got {order})")
        self.order, self.prob, self.bow, self.name = order, prob, bow, str(name)
        self.vocab = sorted(g[0] for g in prob if len(g) == 1)
        if EOS not in self.vocab:
            raise ValueError(f"n-gram LM {self.name} has no {EOS} unigram")

    def logprob(self, history: Sequence[str], word: str) -> float:
        """log P(word | history): the longest stored n-gram ending in `word`, plus the back-off weights of the
        longer contexts skipped on the way. Words the model does not know score as <unk> (or -inf without one)."""
        if (word,) not in self.prob:
            word = UNK
            if (word,) not in self.prob:
                return float("-inf")
        context = tuple(history[-(self.order - 1):]) if self.order > 1 else ()
        backoff = 0.0
        while True:
            p = self.prob.get(context + (word,))
            if p is not None:
                return backoff + p
            backoff += self.bow.get(context, 0.0)
            context = context[1:]

    def sentence_logprob(self, words: Sequence[str]) -> float:
        """log P(words </s> | <s>)."""
        history, total = [BOS], 0.0
        for w in list(words) + [EOS]:
            total += self.logprob(history, w)
            history.append(w)
        return total

    def write_arpa(self, path) -> None:
        """The model as an ARPA file (gzip if `path` ends in .gz), written atomically."""
        by_order = [[] for _ in range(self.order + 1)]
        for g in self.prob:
            by_order[len(g)].append(g)
        lines = ["", "\\data\\"] + [f"ngram {n}={len(by_order[n])}" for n in range(1, self.order + 1)]
        for n in range(1, self.order + 1):
            lines += ["", f"\\{n}-grams:"]
            for g in sorted(by_order[n]):
                p = NO_PROB if g == (BOS,) else self.prob[g] / LOG10
                fields = [f"{p:.6f}", " ".join(g)]
                if n < self.order and g in self.bow:
                    fields.append(f"{self.bow[g] / LOG10:.6f}")
                lines.append("\t".join(fields))
        lines += ["", "\\end\\", ""]
        opener = gzip.open if str(path).endswith(".gz") else open
        with atomic_path(path) as tmp, opener(tmp, "wt", encoding="utf-8") as f:
            f.write("\n".join(lines))

    @classmethod
    def read_arpa(cls, path, vocabulary: Optional[Iterable[str]] = None) -> "NgramLM":
        """An ARPA file (.gz too). With `vocabulary`, the longer n-grams that hold another word are left out (all
        unigrams stay): a search over a lexicon never reaches them, and a large LM then loads faster and smaller,
        with the same probabilities for the lexicon's sentences."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"n-gram LM {path} does not exist")
        opener = gzip.open if path.suffix == ".gz" else open
        prob, bow, order, n = {}, {}, 0, 0
        keep = None if vocabulary is None else set(vocabulary) | {BOS, EOS, UNK}
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("ngram ") or line in ("\\data\\", "\\end\\"):
                    continue
                if line.startswith("\\") and line.endswith("-grams:"):
                    n = int(line[1:-len("-grams:")])
                    order = max(order, n)
                    continue
                fields = line.split()
                if n == 0 or len(fields) not in (n + 1, n + 2):
                    raise ValueError(f"{path}:{lineno}: not an ARPA {n}-gram line: {line[:80]!r}")
                g = tuple(fields[1:n + 1])
                if keep is not None and n > 1 and not keep.issuperset(g):
                    continue
                try:
                    p = float(fields[0])
                    prob[g] = float("-inf") if p <= NO_PROB else p * LOG10
                    if len(fields) == n + 2:
                        bow[g] = float(fields[-1]) * LOG10
                except ValueError as e:
                    raise ValueError(f"{path}:{lineno}: {e}") from None
        if not prob:
            raise ValueError(f"{path} holds no n-grams: not an ARPA file")
        return cls(order, prob, bow, name=path)


class WordVectors:
    """log P(w | context) for every word of a fixed list at once, as a vector per context: the shorter context's
    vector plus this context's back-off weight, with this context's stored n-grams written over it. Every context's
    vector is cached (the shorter ones serve many longer ones), up to `max_floats` numbers in all."""

    def __init__(self, lm: NgramLM, words: Sequence[str], max_floats: int = 2 ** 24):
        self.lm, self.size = lm, len(words)
        index = {w: i for i, w in enumerate(words)}
        stored = defaultdict(lambda: ([], []))  # context -> (indices into words, log-probs) of its stored n-grams
        for g, p in lm.prob.items():
            i = index.get(g[-1])
            if i is not None:
                stored[g[:-1]][0].append(i)
                stored[g[:-1]][1].append(p)
        self.stored = {h: (np.array(i, dtype=np.int64), np.array(p)) for h, (i, p) in stored.items()}
        self.unk = lm.prob.get((UNK,), float("-inf"))
        self.max_cached = max(8, max_floats // max(1, self.size))
        self._cache = {}

    def __call__(self, context: Sequence[str]) -> np.ndarray:
        """The vector after `context` (its last order - 1 words count); read-only."""
        return self._vector(tuple(context[len(context) - self.lm.order + 1:]) if self.lm.order > 1 else ())

    def _vector(self, context: tuple) -> np.ndarray:
        out = self._cache.get(context)
        if out is None:
            if context:
                out = self._vector(context[1:]) + self.lm.bow.get(context, 0.0)
            else:
                out = np.full(self.size, self.unk, dtype=np.float64)
            entry = self.stored.get(context)
            if entry is not None:
                out[entry[0]] = entry[1]
            if len(self._cache) >= self.max_cached:
                self._cache.clear()
            self._cache[context] = out
            out.flags.writeable = False
        return out


def train_kneser_ney(sentences: Iterable[Sequence[str]], order: int = 3, name: str = "<n-gram>") -> NgramLM:
    """Interpolated modified Kneser-Ney estimates from sentences of words (see the module docstring)."""
    if order < 1:
        raise ValueError(f"n-gram order must be >= 1 (got {order})")
    counts = [Counter() for _ in range(order + 1)]  # counts[n]: the n-grams' counts as estimation uses them
    vocab = {EOS, UNK}
    for words in sentences:
        vocab.update(words)
        seq = [BOS, *words, EOS]
        for i in range(1, len(seq)):
            g = tuple(seq[max(0, i - order + 1):i + 1])
            counts[len(g)][g] += 1  # the highest order, or a shorter n-gram that starts at <s>
    if not any(counts):
        raise ValueError(f"{name}: no sentences to estimate an n-gram LM from")
    for n in range(order, 1, -1):  # continuation counts: distinct words before each (n-1)-gram
        for suffix, c in Counter(g[1:] for g in counts[n]).items():
            counts[n - 1][suffix] = c
    prob, gamma = {}, {}  # linear probabilities of the stored n-grams; interpolation weights of their contexts

    def interpolated(g: tuple) -> float:
        if g in prob:
            return prob[g]
        return gamma.get(g[:-1], 1.0) * interpolated(g[1:])

    for n in range(1, order + 1):
        discounts = _discounts(counts[n].values())
        totals, kinds = Counter(), defaultdict(lambda: [0, 0, 0])
        for g, c in counts[n].items():
            totals[g[:-1]] += c
            kinds[g[:-1]][min(c, 3) - 1] += 1
        for h, total in totals.items():
            gamma[h] = sum(d * k for d, k in zip(discounts, kinds[h])) / total
        uniform = 1.0 / len(vocab)  # <s> is never predicted
        for g, c in counts[n].items():
            below = uniform if n == 1 else interpolated(g[1:])
            prob[g] = (c - discounts[min(c, 3) - 1]) / totals[g[:-1]] + gamma[g[:-1]] * below
        if n == 1:
            for w in vocab - {g[0] for g in counts[1]}:  # never a continuation (<unk>): the uniform share
                prob[(w,)] = gamma[()] * uniform
    log_prob = {g: math.log(p) for g, p in prob.items()}
    log_prob[(BOS,)] = float("-inf")
    # The unigrams' weight on the uniform distribution is folded into their probabilities; ARPA has no
    # back-off weight for the empty context.
    bow = {h: math.log(g) if g > 0 else float("-inf") for h, g in gamma.items() if h}
    return NgramLM(order, log_prob, bow, name)


def _discounts(values: Iterable[int]) -> Tuple[float, float, float]:
    """Modified Kneser-Ney's discounts for counts 1, 2 and 3+ from the order's count-of-counts n1..n4 (Chen &
    Goodman's estimates); 0.5 / 1 / 1.5 where the text is too small to have every n_k, or an estimate falls outside
    (0, count) (text whose sentences repeat: a discount of 0 would leave no probability to back off with)."""
    n = Counter(min(v, 5) for v in values)
    n1, n2, n3, n4 = (n[k] for k in (1, 2, 3, 4))
    fallback = (0.5, 1.0, 1.5)
    if min(n1, n2, n3, n4) == 0:
        return fallback
    y = n1 / (n1 + 2 * n2)
    d = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
    return d if all(0 < x < k for x, k in zip(d, (1, 2, 3))) else fallback
