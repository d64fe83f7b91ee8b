"""The k2 backend of `mtp_asr.decode.lattice`: the same operations, on k2 FsaVecs, with identical results.

k2 is optional and imported only when used. Its PyPI release (1.23.4) exists for Python 3.9 + torch 1.13.1 only;
newer wheels, one per torch release, come from k2-fsa's own index: `bash tools/install_k2.sh` picks the right one.

- N-best: forward scores in the tropical semiring give every final arc's path score (a trie has one path per final
  arc); the n best final arcs are chosen, and `k2.shortest_path` on copies of the lattice in which only that final
  arc is kept returns each path.
- Totals and posteriors: forward scores in the log semiring (`get_tot_scores`).
- Sampling: `k2.random_paths`, as `k2.Nbest.from_lattice` and `k2.MWERLoss` sample. It is deterministic (arithmetic
  coding over the path distribution, no seed), so its draws follow the posteriors more evenly than independent ones.
- MWER: `expected_word_errors` runs `k2.MWERLoss` on word-labelled lattices.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from mtp_asr.decode.lattice import EOS, Lattice, Path, _check_positive, _sort_paths, arc_words

INSTALL_HINT = ("the k2 lattice backend needs k2: `bash tools/install_k2.sh` installs the k2 wheel matching your "
                "torch from https://k2-fsa.github.io/k2/ (the PyPI release, k2 1.23.4, needs Python 3.9 + torch "
                "1.13.1: `bash tools/install_k2.sh --ci` builds such a venv); or use the built-in backend")


def k2_available() -> bool:
    try:
        import k2  # noqa: F401
    except (ImportError, OSError):  # OSError: a k2 built for another torch fails to load its libraries
        return False
    return True


def _import_k2():
    try:
        import k2
    except (ImportError, OSError) as e:
        raise ImportError(f"{INSTALL_HINT} (import k2 failed: {e})") from e
    return k2


def word_table(words: Iterable[str]) -> Dict[str, int]:
    """Word -> id from 1 (k2 reads label 0 as epsilon)."""
    return {w: i for i, w in enumerate(sorted(set(words)), start=1)}


def to_k2(lattices: Sequence[Lattice], to_words: Optional[Callable[[Sequence[int]], Sequence[str]]] = None,
          word_ids: Optional[Dict[str, int]] = None):
    """An FsaVec of the trimmed lattices (dead ends removed): labels are tokens (-1 on final arcs), scores the arc
    scores, attribute `heads` the heads. With to_words and word_ids, aux_labels (ragged) hold the ids of the words
    each arc completes (`lattice.arc_words`), -1 on final arcs: a token-to-word transducer, as k2.MWERLoss wants.
    """
    k2 = _import_k2()
    import torch

    if (to_words is None) != (word_ids is None):
        raise ValueError("to_k2: give both to_words and word_ids, or neither")
    fsas = []
    for lat in lattices:
        lat = lat.trimmed()
        if lat.arcs:
            arcs = torch.tensor([[a.src, a.dst, a.token, 0] for a in lat.arcs], dtype=torch.int32)
            arcs[:, 3] = torch.tensor([a.score for a in lat.arcs], dtype=torch.float32).view(torch.int32)
            fsa = k2.Fsa(arcs)
        else:
            fsa = k2.Fsa.from_str("")  # no complete path: k2's empty FSA (it has no states at all)
        fsa.heads = torch.tensor([a.head for a in lat.arcs], dtype=torch.int32)
        if to_words is not None:
            labels = []
            for a, words in zip(lat.arcs, arc_words(lat, to_words)):
                try:
                    ids = [word_ids[w] for w in words]
                except KeyError as e:
                    raise ValueError(f"to_k2: word {e} is not in word_ids") from None
                labels.append(ids + [EOS] if a.token == EOS else ids)
            fsa.aux_labels = k2.RaggedTensor(labels, dtype=torch.int32)
        fsas.append(fsa)
    return k2.create_fsa_vec(fsas)


class K2Backend:
    """The operations of `lattice.BuiltinBackend`, computed by k2 on a whole batch of lattices at once."""

    name = "k2"

    def __init__(self):
        self.k2 = _import_k2()
        import torch

        self.torch = torch

    def _vec(self, lattices: Sequence[Lattice], scale: float = 1.0):
        vec = to_k2(lattices)
        if scale != 1.0:
            vec.scores = vec.scores * scale
        return vec

    def nbest(self, lattices: Sequence[Lattice], n: int) -> List[List[Path]]:
        _check_positive("n", n)
        k2, torch = self.k2, self.torch
        vec = self._vec(lattices)
        arcs = vec.arcs.values()  # (arcs, 4): src and dst numbered within their FSA, label, score bits
        state_start = vec.arcs.shape().row_splits(1).long()  # first state of each FSA in the vector
        arc_start = vec.arcs.shape().row_splits(2).long()[state_start]  # first arc of each FSA
        arc_fsa = torch.repeat_interleave(torch.arange(len(lattices)), arc_start[1:] - arc_start[:-1])
        forward = vec.get_forward_scores(use_double_scores=True, log_semiring=False)
        final = (vec.labels == EOS).nonzero()[:, 0]
        final_scores = forward[state_start[arc_fsa[final]] + arcs[final, 0].long()] + vec.scores[final].double()

        # Per FSA, its final arcs scoring at least the n-th best (ties are all kept, then ordered like the
        # built-in backend does, by tokens).
        chosen: List[List[Tuple[float, int]]] = [[] for _ in lattices]
        for arc, score, fsa in zip(final.tolist(), final_scores.tolist(), arc_fsa[final].tolist()):
            chosen[fsa].append((score, arc))
        copies, keep = [], []
        for fsa, cands in enumerate(chosen):
            cands.sort(reverse=True)
            cut = cands[min(n, len(cands)) - 1][0] if cands else 0.0
            for score, arc in cands:
                if score >= cut:
                    copies.append(fsa)
                    keep.append(arc - int(arc_start[fsa]))  # arc index within its FSA
        if not copies:
            return [[] for _ in lattices]
        masked = k2.index_fsa(vec, torch.tensor(copies, dtype=torch.int32))
        copy_start = masked.arcs.shape().row_splits(2).long()[masked.arcs.shape().row_splits(1).long()]
        kept_arc = copy_start[:-1] + torch.tensor(keep)
        scores = masked.scores.clone()
        drop = masked.labels == EOS
        drop[kept_arc] = False
        scores[drop] = float("-inf")
        masked.scores = scores
        best = k2.shortest_path(masked, use_double_scores=True)
        totals = best.get_tot_scores(use_double_scores=True, log_semiring=False).tolist()
        splits = best.arcs.shape().row_splits(2).long()[best.arcs.shape().row_splits(1).long()].tolist()
        labels, heads = best.labels.tolist(), best.heads.tolist()
        out: List[List[Path]] = [[] for _ in lattices]
        for c, fsa in enumerate(copies):
            lo, hi = splits[c], splits[c + 1]
            out[fsa].append(Path(tuple(labels[lo:hi - 1]), tuple(heads[lo:hi]), totals[c]))
        return [_sort_paths(paths)[:n] for paths in out]

    def total_scores(self, lattices: Sequence[Lattice], scale: float = 1.0) -> List[float]:
        vec = self._vec(lattices, scale)
        return vec.get_tot_scores(use_double_scores=True, log_semiring=True).tolist()

    def path_posteriors(self, lattices: Sequence[Lattice], scale: float = 1.0) -> List[List[Tuple[Path, float]]]:
        every = self.nbest(lattices, max([lat.num_paths for lat in lattices] + [1]))
        totals = self.total_scores(lattices, scale)
        return [[(p, math.exp(scale * p.score - t)) for p in paths] for paths, t in zip(every, totals)]

    def sample_paths(self, lattices: Sequence[Lattice], num_paths: int, seed: int = 0,
                     scale: float = 1.0) -> List[List[Path]]:
        """k2.random_paths draws, in proportion to exp(scale * score). `seed` is unused: k2 has no randomness."""
        _check_positive("num_paths", num_paths)
        vec = self._vec(lattices)
        labels, heads, scores = vec.labels.tolist(), vec.heads.tolist(), vec.scores.tolist()
        scaled = self._vec(lattices, scale)
        drawn = self.k2.random_paths(scaled, use_double_scores=True, num_paths=num_paths).tolist()
        out = []
        for per_fsa in drawn:
            paths = []
            for arc_ids in per_fsa:
                total = 0.0
                for a in arc_ids:
                    total += scores[a]
                paths.append(Path(tuple(labels[a] for a in arc_ids[:-1]), tuple(heads[a] for a in arc_ids), total))
            out.append(paths)
        return out


def expected_word_errors(lattices: Sequence[Lattice], refs: Sequence[Sequence[str]],
                         to_words: Callable[[Sequence[int]], Sequence[str]], num_paths: int = 200,
                         nbest_scale: float = 0.5, temperature: float = 1.0) -> List[float]:
    """Per lattice, the expected word errors of `k2.MWERLoss`: num_paths paths sampled from the lattice with scores
    scaled by nbest_scale, one kept per distinct word sequence, posteriors softmax(score / temperature) over them.
    The built-in counterpart: `lattice.mwer_from_paths` over the same paths."""
    k2 = _import_k2()
    if len(refs) != len(lattices):
        raise ValueError(f"expected_word_errors: {len(lattices)} lattices but {len(refs)} references")
    words = [w for ref in refs for w in ref]
    for lat in lattices:
        for arc_w in arc_words(lat.trimmed(), to_words):
            words.extend(arc_w)
    ids = word_table(words)
    vec = to_k2(lattices, to_words, ids)
    loss = k2.MWERLoss(temperature=temperature, use_double_scores=True, reduction="none")
    per_path = loss(vec, [[ids[w] for w in ref] for ref in refs], nbest_scale=nbest_scale, num_paths=num_paths)
    return per_path.sum().tolist()
