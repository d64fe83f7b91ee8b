"""Lattices of explored beam-search hypotheses, the built-in backend, and (where k2 imports) the k2 backend.

Runs in the main venv (no k2: the k2 tests skip) and in the k2 lane's Python 3.9 + torch 1.13.1 + k2 1.23.4 venv
(tools/run_k2_tests.sh), where MTP_ASR_REQUIRE_K2=1 turns a missing k2 into failures instead of skips. It needs
nothing from tests/conftest.py (the lane runs it with --noconftest).
"""
import gzip
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path as FilePath

import pytest

from mtp_asr.decode.lattice import (
    EOS,
    BuiltinBackend,
    Lattice,
    LatticeBuilder,
    Path,
    arc_words,
    get_backend,
    load_lattices,
    mwer_from_paths,
    mwer_paths,
    nbest,
    path_posteriors,
    sample_paths,
    save_lattices,
    total_score,
    unique_paths,
    word_errors,
)
from mtp_asr.decode.lattice_k2 import k2_available

REPO = FilePath(__file__).resolve().parent.parent
REQUIRE_K2 = os.environ.get("MTP_ASR_REQUIRE_K2") == "1"
needs_k2 = pytest.mark.skipif(not (REQUIRE_K2 or k2_available()),
                              reason="k2 is not installed (the k2 lane, tools/run_k2_tests.sh, runs these)")


def hyp(tokens, scores, heads, finished, positions=None):
    d = {"tokens": tokens, "token_scores": scores, "heads": heads, "finished": finished}
    if positions is not None:
        d["positions"] = positions
    return d


# Hand-made: "5 6" finished; "5 7" with 7 from head 2 (an mtp-beam block [5, 7]) left unfinished; "5 7" with 7 from
# head 1 (the next call) finished; the empty hypothesis finished at once.
HAND = [
    hyp([5, 6], [-0.5, -0.25, -0.125], [1, 1, 1], True),
    hyp([5, 7], [-0.5, -1.0], [1, 2], False),
    hyp([5, 7], [-0.5, -1.5, -0.75], [1, 1, 1], True),
    hyp([], [-3.0], [1], True),
]
HAND_ARCS = [
    (0, 1, 5, -0.5, 1),
    (0, 5, EOS, -3.0, 1),
    (1, 2, 6, -0.25, 1),
    (1, 3, 7, -1.5, 1),
    (1, 4, 7, -1.0, 2),  # the head-2 branch: same token, another factorisation
    (2, 5, EOS, -0.125, 1),
    (3, 5, EOS, -0.75, 1),
]


def random_hyps(rng: random.Random, num_heads: int = 3, vocab: int = 5, steps: int = 14, max_len: int = 6,
                grid: bool = False, p_eos: float = 0.3):
    """Hypotheses as a beam search explores them: each step extends an explored, unfinished hypothesis with a
    block of 1..num_heads tokens (token i of a block from head i), maybe ending in EOS. A token's score depends on
    (prefix, token, head) only, as the model's would. grid: scores on a 1/4 grid, so equal path scores occur."""
    memo = {}

    def score(prefix, token, head):
        key = (prefix, token, head)
        if key not in memo:
            memo[key] = -rng.randint(0, 12) / 4 if grid else -rng.expovariate(1.0)
        return memo[key]

    hyps = [hyp([], [], [], False)]
    for _ in range(steps):
        h = rng.choice([h for h in hyps if not h["finished"] and len(h["tokens"]) < max_len])
        new = hyp(list(h["tokens"]), list(h["token_scores"]), list(h["heads"]), False)
        for k in range(1, rng.randint(1, num_heads) + 1):
            prefix = tuple(zip(new["tokens"], new["heads"]))
            token = EOS if rng.random() < p_eos or len(new["tokens"]) == max_len else rng.randrange(vocab)
            new["token_scores"].append(score(prefix, token, k))
            new["heads"].append(k)
            if token == EOS:
                new["finished"] = True
                break
            new["tokens"].append(token)
        hyps.append(new)
    return hyps


def brute_force_paths(lat: Lattice):
    """All complete paths by depth-first search over the arcs (independent of Lattice.complete_paths)."""
    out = []

    def walk(state, tokens, heads, score):
        for a in lat.arcs:
            if a.src != state:
                continue
            if a.token == EOS:
                out.append(Path(tuple(tokens), tuple(heads + [a.head]), score + a.score))
            else:
                walk(a.dst, tokens + [a.token], heads + [a.head], score + a.score)

    walk(0, [], [], 0.0)
    return out


def random_lattices(seed: int, count: int, **kw):
    rng = random.Random(seed)
    return [Lattice.from_hypotheses(random_hyps(rng, **kw)) for _ in range(count)]


# --- representation ---------------------------------------------------------------------------------------------

def test_hand_built_lattice_states_and_arcs():
    lat = Lattice.from_hypotheses(HAND)
    assert lat.num_states == 6 and lat.final_state == 5
    assert [tuple(a) for a in lat.arcs] == HAND_ARCS
    assert lat.num_paths == 3
    assert lat.prefixes() == [(), (5,), (5, 6), (5, 7), (5, 7), ()]
    paths = {p.tokens: p for p in lat.complete_paths()}
    assert paths[(5, 6)] == Path((5, 6), (1, 1, 1), -0.875)
    assert paths[(5, 7)] == Path((5, 7), (1, 1, 1), -2.75)
    assert paths[()] == Path((), (1,), -3.0)


def test_hypothesis_order_does_not_matter_and_duplicates_merge():
    lat = Lattice.from_hypotheses(HAND)
    assert Lattice.from_hypotheses(list(reversed(HAND)) + HAND[:2]) == lat


def test_positions_follow_from_heads():
    # A block [a, b, c] proposed from the state after 2 tokens: heads 1, 2, 3, all from position 2; EOS by head 1.
    h = hyp([4, 4, 1, 2, 3], [-0.1] * 6, [1, 1, 1, 2, 3, 1], True, positions=[0, 1, 2, 2, 2, 5])
    path, = Lattice.from_hypotheses([h]).complete_paths()
    assert path.positions == (0, 1, 2, 2, 2, 5)
    with pytest.raises(ValueError, match="hypothesis 0: token 4 .head 3. has position 3, expected 2"):
        Lattice.from_hypotheses([hyp([4, 4, 1, 2, 3], [-0.1] * 5, [1, 1, 1, 2, 3], False,
                                     positions=[0, 1, 2, 2, 3])])


def test_builder_extends_node_by_node_as_a_beam_search_would():
    b = LatticeBuilder()
    n5 = b.add([5], [-0.5], [1], False)  # call 1: head 1 proposes 5
    assert b.extend(n5, [6], [-0.25, -0.125], [1, 1], True) == b.extend(n5, [6], [-0.25], [1], False)
    b.extend(n5, [7], [-1.0], [2], False, positions=[0])  # the block [5, 7]: 7 from head 2 at position 0
    n57 = b.extend(n5, [7], [-1.5], [1], False)
    b.extend(n57, [], [-0.75], [1], True)
    b.add([], [-3.0], [1], True)
    assert b.build() == Lattice.from_hypotheses(HAND)
    with pytest.raises(ValueError, match="token 1 has head 3"):  # depth counts from the start, not from n5
        b.extend(n5, [8], [-1.0], [3], False)
    with pytest.raises(ValueError, match=r"token 1 \(head 2\) has position 1, expected 0"):
        b.extend(n5, [8], [-1.0], [2], False, positions=[1])


def test_beam_hypothesis_objects_are_accepted():
    class BeamHypothesis:  # the attributes mtp_asr.decode.beam.BeamHypothesis has
        def __init__(self, **kw):
            self.__dict__.update(kw)

    objs = [BeamHypothesis(**h, positions=[d - k + 1 for d, k in enumerate(h["heads"])], score=0.0) for h in HAND]
    assert Lattice.from_hypotheses(objs) == Lattice.from_hypotheses(HAND)


@pytest.mark.parametrize("bad, message", [
    (hyp([5, 6], [-0.5, -0.25], [1, 1], True), "2 tokens . EOS need 3 scores and heads"),
    (hyp([5], [-0.5], [2], False), "token 0 has head 2"),
    (hyp([5], [float("nan")], [1], False), "token 0 has the non-finite score nan"),
    (hyp([5], [-0.7], [1], False), r"token 0 \(5, head 1\) has score -0.7.*earlier hypothesis"),
    (hyp([-3], [-0.5], [1], False), "token 0 is -3; tokens are >= 0"),
])
def test_bad_hypotheses_are_named(bad, message):
    with pytest.raises(ValueError, match="hypothesis 1: " + message):
        Lattice.from_hypotheses([HAND[0], bad])


@pytest.mark.parametrize("num_states, arcs, message", [
    (3, [(0, 1, 5, -1.0, 1), (0, 1, 6, -1.0, 1), (1, 2, EOS, 0.0, 1)], "state 1 has 2 entering arcs"),
    (3, [(0, 1, 5, -1.0, 1), (1, 2, 6, 0.0, 1)], "exactly the arcs into the final state 2 carry token -1"),
    (3, [(1, 2, EOS, 0.0, 1), (0, 1, 5, -1.0, 1)], "sorted by source state"),
    (3, [(1, 1, 5, -1.0, 1)], "src < dst"),
    (3, [(0, 1, 5, -1.0, 0), (1, 2, EOS, 0.0, 1)], "heads are numbered from 1"),
    (1, [], "at least a start and a final state"),
    (3, [(0, 1, 5)], "not .src, dst, token, score, head."),
])
def test_invalid_lattices_are_rejected(num_states, arcs, message):
    with pytest.raises(ValueError, match=message):
        Lattice(num_states, arcs)


def test_scores_are_float32():
    lat = Lattice(2, [(0, 1, EOS, 0.1, 1)])
    assert lat.arcs[0].score != 0.1 and abs(lat.arcs[0].score - 0.1) < 1e-8  # 0.1 is not a float32 value


def test_dict_round_trip_through_json(tmp_path):
    lats = random_lattices(seed=3, count=4)
    for lat in lats:
        assert Lattice.from_dict(json.loads(json.dumps(lat.to_dict()))) == lat
    out = tmp_path / "lats" / "lattices.jsonl.gz"
    save_lattices(out, {f"utt{i}": lat for i, lat in enumerate(lats)})
    assert load_lattices(out) == {f"utt{i}": lat for i, lat in enumerate(lats)}
    assert [p.name for p in out.parent.iterdir()] == ["lattices.jsonl.gz"]  # no temporary file left behind
    with gzip.open(out, "wt") as f:
        f.write(json.dumps({"id": "u", "num_states": 2, "arcs": [[0, 1, 3, 0.0, 1]]}) + "\n")
    with pytest.raises(ValueError, match=f"{out}:1: not a lattice line: .*carry token -1"):
        load_lattices(out)
    with pytest.raises(ValueError, match="needs 'num_states' and 'arcs'"):
        Lattice.from_dict({"arcs": []})


def test_trimmed_drops_dead_ends_only():
    lat = Lattice.from_hypotheses(HAND)
    trimmed = lat.trimmed()
    assert trimmed.num_states == 5 and len(trimmed.arcs) == 6
    assert (1, 4, 7, -1.0, 2) not in [tuple(a) for a in trimmed.arcs]
    assert sorted(trimmed.complete_paths()) == sorted(lat.complete_paths())


def test_no_finished_hypothesis_gives_an_empty_lattice():
    lat = Lattice.from_hypotheses([hyp([3, 4], [-1.0, -1.0], [1, 1], False)])
    assert lat.num_paths == 0 and lat.trimmed() == Lattice(2, [])
    backend = BuiltinBackend()
    assert backend.nbest([lat], 3) == [[]]
    assert backend.total_scores([lat]) == [-math.inf]
    assert backend.sample_paths([lat], 5) == [[]]
    assert Lattice.from_hypotheses([]) == Lattice(2, [])


def test_module_imports_without_torch_or_the_toolkit():
    code = ("import sys, mtp_asr.decode.lattice; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'k2', 'mtp_asr')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert out.strip() == str(["mtp_asr", "mtp_asr.decode", "mtp_asr.decode.lattice", "mtp_asr.utils"])


# --- built-in backend -------------------------------------------------------------------------------------------

def test_nbest_of_hand_built_lattice():
    lat = Lattice.from_hypotheses(HAND)
    assert nbest(lat, 2) == [Path((5, 6), (1, 1, 1), -0.875), Path((5, 7), (1, 1, 1), -2.75)]
    assert len(nbest(lat, 10)) == 3
    with pytest.raises(ValueError, match="n must be >= 1"):
        nbest(lat, 0)


@pytest.mark.parametrize("grid", [False, True])
def test_nbest_matches_brute_force(grid):
    for lat in random_lattices(seed=11, count=30, grid=grid):
        every = sorted(brute_force_paths(lat), key=lambda p: (-p.score, p.tokens, p.heads))
        for n in (1, 3, len(every) + 2):
            assert nbest(lat, n) == every[:n]


def test_total_score_and_posteriors_match_brute_force():
    for lat in random_lattices(seed=5, count=20):
        every = brute_force_paths(lat)
        for scale in (1.0, 0.5):
            expect = math.log(sum(math.exp(scale * p.score) for p in every))
            assert total_score(lat, scale) == pytest.approx(expect, abs=1e-12)
            post = path_posteriors(lat, scale)
            assert sum(q for _, q in post) == pytest.approx(1.0, abs=1e-12)
            assert [p for p, _ in post] == nbest(lat, len(every))
            for p, q in post:
                assert q == pytest.approx(math.exp(scale * p.score - expect), abs=1e-12)


def empirical_gap(samples, posteriors):
    """Largest difference between a path's sampled frequency and its exact posterior."""
    counts = Counter((p.tokens, p.heads) for p in samples)
    assert set(counts) <= {(p.tokens, p.heads) for p, _ in posteriors}
    return max(abs(counts[(p.tokens, p.heads)] / len(samples) - q) for p, q in posteriors)


def test_builtin_sampling_follows_posteriors():
    for scale in (1.0, 0.5):
        for lat in random_lattices(seed=8, count=5):
            samples = sample_paths(lat, 20000, seed=1, scale=scale)
            assert len(samples) == 20000
            assert empirical_gap(samples, path_posteriors(lat, scale)) < 0.015  # > 4 standard deviations
    lat = random_lattices(seed=8, count=1)[0]
    assert sample_paths(lat, 50, seed=2) == sample_paths(lat, 50, seed=2)


def test_unique_paths_keep_the_best_factorisation():
    a = Path((1, 2), (1, 1, 1), -2.0)
    b = Path((1, 2), (1, 2, 1), -1.5)  # the same tokens, "2" from head 2
    c = Path((3,), (1, 1), -1.0)
    assert unique_paths([a, c, b, a, c]) == [c, b]


def test_mwer_paths_from_nbest_and_from_sampling():
    lat = Lattice.from_hypotheses(HAND)
    (top,), = mwer_paths([lat], source="nbest", num_paths=1)
    assert top.tokens == (5, 6)
    sampled, = mwer_paths([lat], source="lattice", num_paths=500, scale=1.0, seed=0)
    assert sorted(p.tokens for p in sampled) == [(), (5, 6), (5, 7)]  # distinct, all three drawn
    with pytest.raises(ValueError, match="unknown MWER source 'words'; choose from nbest, lattice"):
        mwer_paths([lat], source="words")


def test_word_errors():
    assert word_errors([], []) == 0
    assert word_errors("a b c".split(), "a x c".split()) == 1
    assert word_errors("a b".split(), "a b c d".split()) == 2
    assert word_errors("b c d".split(), "a b c".split()) == 2
    assert word_errors("a b c".split(), []) == 3


# Pieces in sentencepiece style: a word starts with a "▁" piece and may continue with suffix pieces.
PIECES = {0: "▁a", 1: "▁b", 2: "s", 3: "▁c", 4: "x"}


def to_words(tokens):
    return "".join(PIECES[t] for t in tokens).replace("▁", " ").split()


def test_mwer_from_paths_by_hand():
    paths = [Path((0, 2), (1, 1, 1), -1.0), Path((0, 1), (1, 1, 1), -2.0), Path((0, 2), (1, 2, 1), -1.5)]
    got = mwer_from_paths(paths, ["as"], to_words, temperature=2.0)
    assert got.words == [("as",), ("a", "b")] and got.errors == [0, 2] and got.scores == [-1.0, -2.0]
    z = math.exp(-0.5) + math.exp(-1.0)
    assert got.posteriors == pytest.approx([math.exp(-0.5) / z, math.exp(-1.0) / z])
    assert got.expected_errors == pytest.approx(2 * math.exp(-1.0) / z)


def test_arc_words_emit_each_word_when_it_is_complete():
    # "▁a" "s" "▁b" EOS: "as" is complete when "▁b" starts the next word; "b" at EOS.
    lat = Lattice.from_hypotheses([hyp([0, 2, 1], [-1.0] * 4, [1] * 4, True)])
    assert arc_words(lat, to_words) == [(), (), ("as",), ("b",)]
    with pytest.raises(ValueError, match="to_words is not incremental"):
        arc_words(lat, lambda tokens: [str(len(tokens))] * len(tokens))  # rewrites earlier words


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown lattice backend 'fst'"):
        get_backend("fst")


# --- k2 backend -------------------------------------------------------------------------------------------------

def test_k2_lane_has_k2():
    if not REQUIRE_K2:
        pytest.skip("only the k2 lane (MTP_ASR_REQUIRE_K2=1) requires k2")
    import k2  # noqa: F401  (fails loudly, with k2's own reason)


def test_k2_backend_absent_names_the_fix():
    if k2_available():
        pytest.skip("k2 is installed")
    with pytest.raises(ImportError, match="tools/install_k2.sh"):
        get_backend("k2")
    assert get_backend("auto").name == "builtin"


@pytest.fixture(scope="module")
def k2b():
    return get_backend("k2")


@needs_k2
def test_k2_conversion(k2b):
    import k2
    from mtp_asr.decode.lattice_k2 import to_k2

    lat = Lattice.from_hypotheses(HAND)
    vec = to_k2([lat, Lattice(2, [])])
    assert vec.shape[0] == 2
    trimmed = lat.trimmed()
    assert vec.arcs.num_elements() == len(trimmed.arcs) == 6  # the dead-end head-2 arc is gone
    assert vec.labels.tolist() == [a.token for a in trimmed.arcs]
    assert vec.scores.tolist() == [a.score for a in trimmed.arcs]
    assert vec.heads.tolist() == [a.head for a in trimmed.arcs]
    best = k2.shortest_path(vec, use_double_scores=True)
    assert best.labels.tolist() == [5, 6, EOS]  # the empty second lattice has no best path
    assert best.get_tot_scores(use_double_scores=True, log_semiring=False).tolist() == [-0.875, -math.inf]


@needs_k2
@pytest.mark.parametrize("grid", [False, True])
def test_k2_and_builtin_nbest_agree(k2b, grid):
    lats = random_lattices(seed=21, count=40, grid=grid) + [Lattice(2, [])]
    builtin = BuiltinBackend()
    for n in (1, 4, 50):
        got, want = k2b.nbest(lats, n), builtin.nbest(lats, n)
        assert [[(p.tokens, p.heads) for p in ps] for ps in got] == [[(p.tokens, p.heads) for p in ps] for ps in want]
        for ps, qs in zip(got, want):
            assert [p.score for p in ps] == pytest.approx([q.score for q in qs], abs=1e-9)


@needs_k2
def test_k2_and_builtin_totals_and_posteriors_agree(k2b):
    lats = random_lattices(seed=22, count=20)
    builtin = BuiltinBackend()
    for scale in (1.0, 0.5):
        assert k2b.total_scores(lats, scale) == pytest.approx(builtin.total_scores(lats, scale), abs=1e-5)
        for got, want in zip(k2b.path_posteriors(lats, scale), builtin.path_posteriors(lats, scale)):
            assert [p for p, _ in got] == [p for p, _ in want]
            assert [q for _, q in got] == pytest.approx([q for _, q in want], abs=1e-5)
    assert k2b.total_scores([Lattice(2, [])]) == [-math.inf]


@needs_k2
def test_k2_sampling_follows_posteriors(k2b):
    lats = random_lattices(seed=23, count=10)
    for scale in (1.0, 0.5):
        for lat, samples in zip(lats, k2b.sample_paths(lats, 1000, scale=scale)):
            assert len(samples) == 1000
            assert empirical_gap(samples, path_posteriors(lat, scale)) <= 2 / 1000  # quantile draws: within 2 paths
            assert {(p.tokens, p.heads): p.score for p in samples}.items() <= \
                {(p.tokens, p.heads): p.score for p in lat.complete_paths()}.items()
    assert k2b.sample_paths([Lattice(2, [])], 3) == [[]]


@needs_k2
def test_k2_mwer_loss_matches_builtin_expected_errors(k2b):
    """k2.MWERLoss (sampled paths, one per word sequence) equals the built-in expected word errors over all paths
    when the sample covers every path: small lattices, many draws, a flat sampling scale."""
    from mtp_asr.decode.lattice_k2 import expected_word_errors

    rng = random.Random(24)
    lats = [Lattice.from_hypotheses(random_hyps(rng, num_heads=1, steps=10, max_len=5)) for _ in range(12)]
    lats.append(Lattice(2, []))  # no complete path: no expected errors
    refs = [to_words([rng.randrange(5) for _ in range(rng.randint(1, 5))]) for _ in lats]
    for temperature in (1.0, 2.0):
        got = expected_word_errors(lats, refs, to_words, num_paths=2000, nbest_scale=0.1, temperature=temperature)
        want = [mwer_from_paths(lat.complete_paths(), ref, to_words, temperature).expected_errors
                for lat, ref in zip(lats, refs)]
        assert got == pytest.approx(want, abs=1e-6)
    assert any(e > 0 for e in want)
