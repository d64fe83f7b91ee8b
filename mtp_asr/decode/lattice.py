"""Lattices of what a beam search explored, and the built-in backend for N-best lists, posteriors and sampling.

Structure. A beam search only ever extends hypotheses at their end, so everything it explored for one utterance is
a set of token prefixes, and a prefix tree (trie) holds each of them exactly once: state 0 is the empty prefix, each
other state is one explored prefix, an arc appends one token. A trie is the right structure here, not a merged DAG:
the score of a token is a log-probability conditioned on the whole prefix before it, so two equal suffixes after
different prefixes carry different scores and could not share arcs anyway; what can be shared -- a common prefix --
the trie shares. Finished hypotheses (ended with EOS) get a final arc, token -1 as in k2, carrying the EOS score into
the one final state, numbered last. Every complete path (start to final state) is then one finished hypothesis, and
it ends with its own final arc: there are as many complete paths as final arcs.

Scores and heads. An arc carries the log-probability of its token under the head that proposed it, and that head
(1..K). `beam` proposes every token with head 1. In `mtp-beam` a call proposes a block [t1 .. tm] from the state
after j tokens, token i by head i; the block becomes m consecutive arcs, the i-th with head i and head i's
log-probability. The position a token was proposed from is therefore implied: the token at depth d (d tokens before
it) with head k was proposed from position j = d - k + 1. Trie arcs are keyed by (token, head): the same text reached
through a different factorisation (e.g. "c" proposed by head 2 in one block and by head 1 in the next call) has a
different score, so it is a different branch, and a path's score is always one consistent factorisation of
log p(tokens). Paths never sum over factorisations (they estimate the same probability; they are not disjoint
events).

Scores are stored as float32 values (what the model computes, and what k2 stores), so every backend adds up the same
numbers in the same order and path scores agree exactly. Unfinished hypotheses (pruned, or stopped at the length
limit) leave arcs that reach no final state; they are kept as explored but belong to no complete path.

This module needs only the standard library and runs under Python 3.9 (the k2 test environment); the k2 backend is
`mtp_asr.decode.lattice_k2`, with the same operations. Backends take lists of lattices (k2 works on batches).
"""
from __future__ import annotations

import gzip
import json
import math
import random
import struct
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from mtp_asr.utils import atomic_path

EOS = -1  # the token of final arcs (k2's label for arcs entering the final state)
MWER_SOURCES = ("nbest", "lattice")


class Arc(NamedTuple):
    src: int
    dst: int
    token: int  # EOS (-1) on final arcs
    score: float  # log-probability under `head`
    head: int  # MTP head (1..K) that proposed the token


class Path(NamedTuple):
    """A complete path: one finished hypothesis."""

    tokens: Tuple[int, ...]  # without EOS
    heads: Tuple[int, ...]  # head of each scored token, EOS last: len(tokens) + 1
    score: float  # total log-probability, EOS included

    @property
    def positions(self) -> Tuple[int, ...]:
        """j of each scored token: it was proposed by head k from the state after j tokens (re-scoring needs it)."""
        return tuple(d - k + 1 for d, k in enumerate(self.heads))


def _float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


class Lattice:
    """One utterance's explored hypotheses: states 0..num_states-1 (0: start, last: final), arcs sorted by src.

    Invariants (checked): src < dst (states are topologically numbered); every state but the start and the final
    one has exactly one entering arc (a trie); the final state is entered by EOS arcs only and has no leaving arcs.
    """

    __slots__ = ("num_states", "arcs")

    def __init__(self, num_states: int, arcs: Sequence[Sequence]):
        if num_states < 2:
            raise ValueError(f"a lattice has at least a start and a final state (got num_states={num_states})")
        final = num_states - 1
        checked, entering = [], [0] * num_states
        for i, a in enumerate(arcs):
            try:
                src, dst, token, score, head = int(a[0]), int(a[1]), int(a[2]), float(a[3]), int(a[4])
            except (TypeError, ValueError, IndexError):
                raise ValueError(f"arc {i} is not (src, dst, token, score, head): {a!r}") from None
            if not 0 <= src < dst < num_states:
                raise ValueError(f"arc {i} {tuple(a)}: need 0 <= src < dst < num_states ({num_states})")
            if (dst == final) != (token == EOS):
                raise ValueError(f"arc {i} {tuple(a)}: exactly the arcs into the final state {final} carry "
                                 f"token {EOS} (EOS)")
            if token < EOS:
                raise ValueError(f"arc {i} {tuple(a)}: tokens are >= 0 (or {EOS} for EOS)")
            if not math.isfinite(score):
                raise ValueError(f"arc {i} {tuple(a)}: the score must be finite")
            if head < 1:
                raise ValueError(f"arc {i} {tuple(a)}: heads are numbered from 1")
            if checked and src < checked[-1].src:
                raise ValueError(f"arc {i} {tuple(a)}: arcs must be sorted by source state")
            entering[dst] += 1
            checked.append(Arc(src, dst, token, _float32(score), head))
        for s in range(1, final):
            if entering[s] != 1:
                raise ValueError(f"state {s} has {entering[s]} entering arcs; a lattice of explored prefixes (a "
                                 f"trie) has exactly one")
        self.num_states = num_states
        self.arcs: Tuple[Arc, ...] = tuple(checked)

    @property
    def final_state(self) -> int:
        return self.num_states - 1

    def __eq__(self, other) -> bool:
        return isinstance(other, Lattice) and (self.num_states, self.arcs) == (other.num_states, other.arcs)

    def __repr__(self) -> str:
        return f"Lattice(num_states={self.num_states}, num_arcs={len(self.arcs)}, num_paths={self.num_paths})"

    @property
    def num_paths(self) -> int:
        """Complete paths: one per final arc."""
        return sum(1 for a in self.arcs if a.token == EOS)

    @classmethod
    def from_hypotheses(cls, hyps: Sequence) -> Lattice:
        """The trie of explored hypotheses: objects or mappings with tokens, token_scores, heads and finished.

        `mtp_asr.decode.beam.BeamHypothesis` fits as is; its `positions`, when given, are checked against the heads.
        """
        builder = LatticeBuilder()
        for i, h in enumerate(hyps):
            get = h.get if isinstance(h, Mapping) else lambda name, default=None: getattr(h, name, default)
            builder.add(get("tokens"), get("token_scores"), get("heads"), bool(get("finished")),
                        positions=get("positions"), where=f"hypothesis {i}")
        return builder.build()

    def to_dict(self) -> dict:
        """JSON-friendly: {"num_states": S, "arcs": [[src, dst, token, score, head], ...]}."""
        return {"num_states": self.num_states, "arcs": [list(a) for a in self.arcs]}

    @classmethod
    def from_dict(cls, d: Mapping) -> Lattice:
        try:
            return cls(d["num_states"], d["arcs"])
        except KeyError as e:
            raise ValueError(f"a lattice dict needs 'num_states' and 'arcs' (missing {e})") from None

    def prefixes(self) -> List[Tuple[int, ...]]:
        """The token prefix of every state (the final state's: ())."""
        out: List[Tuple[int, ...]] = [()] * self.num_states
        for a in self.arcs:
            if a.token != EOS:
                out[a.dst] = out[a.src] + (a.token,)
        return out

    def complete_paths(self) -> List[Path]:
        """Every complete path, in final-arc order. Scores are summed from the start, the order k2 uses too."""
        parent: List[Optional[Arc]] = [None] * self.num_states
        forward = [0.0] * self.num_states
        for a in self.arcs:
            if a.token != EOS:
                parent[a.dst] = a
                forward[a.dst] = forward[a.src] + a.score
        paths = []
        for a in self.arcs:
            if a.token != EOS:
                continue
            tokens, heads, s = [], [a.head], a.src
            while parent[s] is not None:
                tokens.append(parent[s].token)
                heads.append(parent[s].head)
                s = parent[s].src
            paths.append(Path(tuple(reversed(tokens)), tuple(reversed(heads)), forward[a.src] + a.score))
        return paths

    def trimmed(self) -> Lattice:
        """The lattice without the states and arcs that lead to no final arc (pruned and unfinished hypotheses)."""
        useful = [False] * self.num_states
        useful[self.final_state] = True
        for a in reversed(self.arcs):  # sorted by src, so every arc leaving dst comes later
            if useful[a.dst]:
                useful[a.src] = True
        useful[0] = True
        new_id, n = {}, 0
        for s in range(self.num_states):
            if useful[s]:
                new_id[s], n = n, n + 1
        return Lattice(n, [(new_id[a.src], new_id[a.dst], a.token, a.score, a.head)
                           for a in self.arcs if useful[a.dst] and useful[a.src]])


class LatticeBuilder:
    """Adds hypotheses to a trie one at a time. A beam search can feed it every candidate as it makes it: `extend`
    adds just the new block after the node its parent hypothesis reached, so recording costs O(new tokens)."""

    def __init__(self):
        # Per trie node: (token, head) -> [child node (None for EOS), score]; and the node's depth (its tokens).
        self._children: List[Dict[Tuple[int, int], list]] = [{}]
        self._depth: List[int] = [0]

    def add(self, tokens: Sequence[int], token_scores: Sequence[float], heads: Sequence[int], finished: bool,
            positions: Optional[Sequence[int]] = None, where: str = "hypothesis") -> int:
        """One whole hypothesis: token_scores and heads cover the tokens, then EOS when finished. Returns the node
        after its tokens."""
        return self.extend(0, tokens, token_scores, heads, finished, positions, where)

    def extend(self, node: int, tokens: Sequence[int], token_scores: Sequence[float], heads: Sequence[int],
               finished: bool, positions: Optional[Sequence[int]] = None, where: str = "hypothesis") -> int:
        """`tokens` (then EOS when finished) appended after trie node `node` (0: the empty prefix; else what add
        or extend returned). positions, if given, are absolute and checked against the heads."""
        tokens, token_scores, heads = list(tokens), list(token_scores), list(heads)
        n_scored = len(tokens) + (1 if finished else 0)
        if len(token_scores) != n_scored or len(heads) != n_scored:
            raise ValueError(f"{where}: {len(tokens)} tokens{' + EOS' if finished else ''} need {n_scored} scores "
                             f"and heads (got {len(token_scores)} scores, {len(heads)} heads)")
        if positions is not None and len(positions) != n_scored:
            raise ValueError(f"{where}: {n_scored} scored tokens but {len(positions)} positions")
        start = self._depth[node]
        for i, (token, score, head) in enumerate(zip(tokens + [EOS], token_scores, heads)):
            d = start + i  # tokens before this one
            if not 1 <= head <= d + 1:
                raise ValueError(f"{where}: token {d} has head {head}; the token at depth d comes from a head in "
                                 f"1..d+1 (head k predicts from the state k-1 tokens back)")
            if positions is not None and positions[i] != d - head + 1:
                raise ValueError(f"{where}: token {d} (head {head}) has position {positions[i]}, expected "
                                 f"{d - head + 1}")
            if token < 0 and i < len(tokens):
                raise ValueError(f"{where}: token {d} is {token}; tokens are >= 0")
            if not math.isfinite(score):
                raise ValueError(f"{where}: token {d} has the non-finite score {score}")
            score = _float32(float(score))
            entry = self._children[node].get((token, head))
            if entry is None:
                child = None
                if token != EOS:
                    child = len(self._children)
                    self._children.append({})
                    self._depth.append(d + 1)
                entry = self._children[node][(token, head)] = [child, score]
            elif abs(entry[1] - score) > 1e-3 * max(1.0, abs(score)):
                # The same prefix, token and head: the model computed the same quantity twice and must agree.
                raise ValueError(f"{where}: token {d} ({token}, head {head}) has score {score:.7g}, but an "
                                 f"earlier hypothesis with the same prefix has {entry[1]:.7g}")
            if entry[0] is not None:  # EOS leads to the final state: the returned node stays before it
                node = entry[0]
        return node

    def build(self) -> Lattice:
        """States numbered breadth-first, children in (token, head) order: the same hypotheses in any order give
        the same lattice."""
        order, number = [0], {0: 0}
        for node in order:  # grows while iterating: breadth-first
            for key in sorted(self._children[node]):
                child = self._children[node][key][0]
                if child is not None:
                    number[child] = len(order)
                    order.append(child)
        final = len(order)
        arcs = []
        for node in order:
            for (token, head), (child, score) in sorted(self._children[node].items()):
                arcs.append((number[node], final if child is None else number[child], token, score, head))
        arcs.sort(key=lambda a: (a[0], a[1], a[4]))
        return Lattice(final + 1, arcs)


def _sort_paths(paths: List[Path]) -> List[Path]:
    """Best first; equal scores in (tokens, heads) order so every backend breaks ties the same way."""
    return sorted(paths, key=lambda p: (-p.score, p.tokens, p.heads))


def _logsumexp(xs: Sequence[float]) -> float:
    if not xs:
        return -math.inf
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


class BuiltinBackend:
    """Exact operations by enumerating complete paths: a trie has exactly one per final arc."""

    name = "builtin"

    def nbest(self, lattices: Sequence[Lattice], n: int) -> List[List[Path]]:
        """Per lattice, its n best complete paths, best first (fewer when it has fewer)."""
        _check_positive("n", n)
        return [_sort_paths(lat.complete_paths())[:n] for lat in lattices]

    def total_scores(self, lattices: Sequence[Lattice], scale: float = 1.0) -> List[float]:
        """log sum over complete paths of exp(scale * score); -inf for a lattice without complete paths."""
        return [_logsumexp([scale * p.score for p in lat.complete_paths()]) for lat in lattices]

    def path_posteriors(self, lattices: Sequence[Lattice], scale: float = 1.0) -> List[List[Tuple[Path, float]]]:
        """Per lattice, every complete path (best first) with its posterior exp(scale * score) / sum over paths."""
        out = []
        for lat, total in zip(lattices, self.total_scores(lattices, scale)):
            out.append([(p, math.exp(scale * p.score - total)) for p in _sort_paths(lat.complete_paths())])
        return out

    def sample_paths(self, lattices: Sequence[Lattice], num_paths: int, seed: int = 0,
                     scale: float = 1.0) -> List[List[Path]]:
        """Per lattice, num_paths complete paths drawn independently with probability proportional to
        exp(scale * score) (none for a lattice without complete paths)."""
        _check_positive("num_paths", num_paths)
        rng = random.Random(seed)
        out = []
        for lat in lattices:
            paths = lat.complete_paths()
            if not paths:
                out.append([])
                continue
            top = max(scale * p.score for p in paths)
            weights = [math.exp(scale * p.score - top) for p in paths]
            out.append(rng.choices(paths, weights=weights, k=num_paths))
        return out


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1 (got {value})")


def get_backend(name: str = "auto"):
    """'builtin', 'k2' (fails with install instructions when k2 is missing) or 'auto' (k2 when importable)."""
    if name == "builtin":
        return BuiltinBackend()
    if name in ("k2", "auto"):
        from mtp_asr.decode.lattice_k2 import K2Backend, k2_available

        if name == "k2" or k2_available():
            return K2Backend()
        return BuiltinBackend()
    raise ValueError(f"unknown lattice backend {name!r}; choose from builtin, k2, auto")


def nbest(lattice: Lattice, n: int, backend: str = "builtin") -> List[Path]:
    return get_backend(backend).nbest([lattice], n)[0]


def total_score(lattice: Lattice, scale: float = 1.0, backend: str = "builtin") -> float:
    return get_backend(backend).total_scores([lattice], scale)[0]


def path_posteriors(lattice: Lattice, scale: float = 1.0, backend: str = "builtin") -> List[Tuple[Path, float]]:
    return get_backend(backend).path_posteriors([lattice], scale)[0]


def sample_paths(lattice: Lattice, num_paths: int, seed: int = 0, scale: float = 1.0,
                 backend: str = "builtin") -> List[Path]:
    return get_backend(backend).sample_paths([lattice], num_paths, seed, scale)[0]


def unique_paths(paths: Sequence[Path]) -> List[Path]:
    """One path per token sequence, the best-scoring factorisation, best first (beam search merges by max too)."""
    best: Dict[Tuple[int, ...], Path] = {}
    for p in paths:
        if p.tokens not in best or (-p.score, p.heads) < (-best[p.tokens].score, best[p.tokens].heads):
            best[p.tokens] = p
    return _sort_paths(list(best.values()))


def mwer_paths(lattices: Sequence[Lattice], source: str = "nbest", num_paths: int = 8, backend="builtin",
               scale: float = 0.5, seed: int = 0) -> List[List[Path]]:
    """The hypotheses MWER training re-scores, per lattice, as distinct token sequences.

    source 'nbest': the num_paths best complete paths; 'lattice': num_paths paths sampled in proportion to
    exp(scale * score) (a smaller scale gives more distinct paths; k2's nbest_scale), as k2.MWERLoss does.
    The trainer re-scores each path with gradient: token i under head heads[i] from position positions[i].
    backend: a name or a backend object.
    """
    if source not in MWER_SOURCES:
        raise ValueError(f"unknown MWER source {source!r}; choose from {', '.join(MWER_SOURCES)}")
    impl = get_backend(backend) if isinstance(backend, str) else backend
    if source == "nbest":
        found = impl.nbest(lattices, num_paths)
    else:
        found = impl.sample_paths(lattices, num_paths, seed, scale)
    return [unique_paths(paths) for paths in found]


def word_errors(hyp: Sequence[str], ref: Sequence[str]) -> int:
    """Word-level Levenshtein distance (substitutions + deletions + insertions)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        cur = [i]
        for j, h in enumerate(hyp, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


class PathErrors(NamedTuple):
    words: List[Tuple[str, ...]]  # distinct word sequences of the paths, best first
    scores: List[float]  # the best path score of each
    errors: List[int]  # word errors of each against the reference
    posteriors: List[float]  # softmax(scores / temperature) over these paths only
    expected_errors: float  # sum of posteriors * errors


def mwer_from_paths(paths: Sequence[Path], ref_words: Sequence[str],
                    to_words: Callable[[Sequence[int]], Sequence[str]], temperature: float = 1.0) -> PathErrors:
    """The expected word errors of a set of paths, posteriors renormalised over them (the MWER objective's value).

    Paths with the same words count once, with their best score (k2.MWERLoss keeps one path per word sequence
    too). MWER training takes `errors` from here and its own differentiable scores of the same paths.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    best: Dict[Tuple[str, ...], float] = {}
    for p in paths:
        words = tuple(to_words(p.tokens))
        best[words] = max(best.get(words, -math.inf), p.score)
    ranked = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))
    words = [w for w, _ in ranked]
    scores = [s for _, s in ranked]
    errors = [word_errors(w, list(ref_words)) for w in words]
    total = _logsumexp([s / temperature for s in scores])
    posteriors = [math.exp(s / temperature - total) for s in scores]
    return PathErrors(words, scores, errors, posteriors, float(sum(p * e for p, e in zip(posteriors, errors))))


def arc_words(lattice: Lattice, to_words: Callable[[Sequence[int]], Sequence[str]]) -> List[Tuple[str, ...]]:
    """The words each arc completes: a word is complete once the next token starts another (or at EOS).

    to_words(tokens) -> words must be incremental (appending a token changes at most the last word and adds words
    after it), as decoding sentencepiece pieces is. Used to put word labels on k2 arcs for word-level MWER.
    """
    prefixes = lattice.prefixes()
    words_of = [tuple(to_words(p)) for p in prefixes]
    out = []
    for i, a in enumerate(lattice.arcs):
        before = words_of[a.src][:-1]  # the last word of a prefix may still grow
        if a.token == EOS:
            after = words_of[a.src]
        else:
            after = words_of[a.dst][:-1]
        if after[: len(before)] != before:
            raise ValueError(f"arc {i} {tuple(a)}: to_words is not incremental: words {before} of "
                             f"{prefixes[a.src]} are not a prefix of {after}")
        out.append(after[len(before):])
    return out


def save_lattices(path, lattices: Mapping[str, Lattice]) -> None:
    """Write {utterance id: lattice} as gzipped JSON lines, atomically (never a half-written file)."""
    with atomic_path(path) as tmp:
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            for utt, lat in lattices.items():
                f.write(json.dumps({"id": utt, **lat.to_dict()}) + "\n")


def load_lattices(path) -> Dict[str, Lattice]:
    out: Dict[str, Lattice] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                d = json.loads(line)
                out[d["id"]] = Lattice.from_dict(d)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a lattice line: {e}") from None
    return out

