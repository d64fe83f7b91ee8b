"""Beam searches: `mtp-beam` reduces to `beam` (one head) and to `mtp-threshold` (beam 1), the cached batched search
equals a cache-free one-hypothesis-at-a-time reference, `beam` is exact when the beam covers the search space, the
reported scores are what a teacher-forced pass gives under the recorded factorisation, length normalisation does
not prefer early EOS, and `mtp-asr decode/benchmark` write the beam results."""
import itertools
import json
import math

import pytest
import torch
from click.testing import CliRunner

from model_fixtures import (  # noqa: F401
    EOS, counting_firsts, counting_task, extra_head_logits, random_batch, random_prompts, single_thread, tiny_lm,
    tiny_speech_llama, speech_checkpoint, trained_counting_lm,
)
from mtp_asr.decode.beam import beam_search
from mtp_asr.decode.generate import generate
from mtp_asr.model.heads import HEAD_KINDS


def search(lm, prefix, lens, limits, method, **kw):
    return beam_search(lm, prefix, lens, method, max_new_tokens=limits, **kw)


def summary(out):
    """Everything but the floating-point scores, per row: the N-best lists and the calls."""
    return [([(h.tokens, h.finished, h.heads, h.positions) for h in hs], hyp.decoder_calls)
            for hs, hyp in zip(out.nbest, out.hyps)]


def scores(out):
    """Every N-best score, flattened (row by row)."""
    return [h.score for hs in out.nbest for h in hs]


# ---- a cache-free reference: the module docstring's definition, one hypothesis and one full forward at a time ----

@torch.no_grad()
def reference_beam(lm, prompt, num_heads, threshold, beam_size, limit, length_norm):
    """(N-best list of (tokens, finished, heads, positions, score), calls) for one utterance. Also checks that no two
    hypotheses ever share a token sequence and ending (the reason the search needs no merging)."""
    K, V = num_heads, lm.decoder.cfg.vocab_size
    live, kept, calls = [((), ())], [], 0  # a hypothesis: (tokens, ((log-prob, head, position), ...))
    while live:
        calls += 1
        pool = list(kept)
        for tokens, scored in live:
            seq = torch.cat([prompt, lm.embed(torch.tensor(tokens, dtype=torch.long)).to(prompt.dtype)])
            states = lm.trunk(seq[None], torch.tensor([prompt.shape[0]]), torch.zeros(1, len(seq), dtype=torch.long))
            top = torch.log_softmax(lm.heads.logits(lm.decoder, 0, states[0][0, -1]), -1).topk(min(beam_size, V))
            for lp, tok in zip(top.values.tolist(), top.indices.tolist()):
                # Heads 2..K after this head-1 candidate (hydra heads depend on it; the other kinds give every
                # candidate the same tail).
                tail = []
                for k, logits in enumerate(extra_head_logits(lm, seq, prompt.shape[0], len(seq) - 1, tok, K), 1):
                    t = int(logits.argmax())
                    if torch.softmax(logits.float(), -1)[t] < threshold:
                        break
                    tail.append((t, float(torch.log_softmax(logits, -1)[t]), k + 1))
                new, new_scored, ended, finished = list(tokens), list(scored), False, False
                for t, lp_t, head in [(tok, lp, 1)] + tail:
                    new_scored.append((lp_t, head, len(tokens)))
                    if t == lm.eos_id:
                        ended = finished = True
                        break
                    new.append(t)
                    if len(new) >= limit:
                        ended = True
                        break
                pool.append((tuple(new), tuple(new_scored), ended, finished))
        assert len({(h[0], h[3]) for h in pool}) == len(pool), "two derivations of one hypothesis"
        ranked = sorted(pool, key=lambda h: -_total(h) / len(h[1]) ** length_norm)[:beam_size]
        kept = [h for h in ranked if h[2]]
        live = [(h[0], h[1]) for h in ranked if not h[2]]
    return [(list(t), f, [s[1] for s in sc], [s[2] for s in sc], _total((t, sc))) for t, sc, _, f in kept], calls


def _total(h):
    return sum(s[0] for s in h[1])


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("method,beam_size,threshold", [("beam", 3, 1.0), ("mtp-beam", 3, 0.3),
                                                         ("mtp-beam", 2, 0.0)])
@pytest.mark.parametrize("rate", [0.0, 1.7], ids=["consecutive", "aligned"])
def test_matches_cache_free_reference(kind, method, beam_size, threshold, rate):
    lm = tiny_lm(kind, num_heads=3, seed=60 + HEAD_KINDS.index(kind), prefix_rate=rate)
    prefix, lens, limits = random_batch(lm, 10, 600, max_new=12)
    out = search(lm, prefix, lens, limits, method, beam_size=beam_size, threshold=threshold, length_norm=0.8)
    K = 1 if method == "beam" else 3
    for r, hs in enumerate(out.nbest):
        want, calls = reference_beam(lm, prefix[r, : lens[r]], K, threshold, beam_size, int(limits[r]), 0.8)
        assert [(h.tokens, h.finished, h.heads, h.positions) for h in hs] == [w[:4] for w in want], f"row {r}"
        assert [h.score for h in hs] == pytest.approx([w[4] for w in want], abs=1e-9)
        assert out.hyps[r].decoder_calls == calls


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("method,threshold", [("beam", 1.0), ("mtp-beam", 0.2)])
def test_batched_equals_unbatched(kind, method, threshold):
    lm = tiny_lm(kind, num_heads=3, seed=70 + HEAD_KINDS.index(kind))
    prefix, lens, limits = random_batch(lm, 16, 700, max_new=16)
    batched = search(lm, prefix, lens, limits, method, beam_size=3, threshold=threshold)
    alone = [search(lm, prefix[r:r + 1, : lens[r]], lens[r:r + 1], limits[r:r + 1], method, beam_size=3,
                    threshold=threshold) for r in range(16)]
    assert summary(batched) == [row for out in alone for row in summary(out)]
    assert scores(batched) == pytest.approx([s for out in alone for s in scores(out)], abs=1e-9)
    assert batched.batch_calls == max(out.batch_calls for out in alone)


# ---- the two reductions ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_mtp_beam_with_one_head_is_beam(kind):
    lm = tiny_lm(kind, num_heads=3, seed=80 + HEAD_KINDS.index(kind))
    prefix, lens, limits = random_batch(lm, 24, 800, max_new=16)
    for beam_size in (1, 2, 4):
        beam = search(lm, prefix, lens, limits, "beam", beam_size=beam_size)
        one_head = search(lm, prefix, lens, limits, "mtp-beam", num_heads=1, threshold=0.0, beam_size=beam_size)
        # all three heads, none of whose tokens can clear a threshold above 1: only the reading of heads 2..K differs
        unreachable = search(lm, prefix, lens, limits, "mtp-beam", threshold=1.01, beam_size=beam_size)
        for other in (one_head, unreachable):
            assert summary(other) == summary(beam)
            assert scores(other) == scores(beam)
            assert other.batch_calls == beam.batch_calls
        assert unreachable.accepted_per_head[1:] == [0, 0]


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7, 1.01])
def test_beam_size_one_is_mtp_threshold(kind, threshold):
    lm = tiny_lm(kind, num_heads=3, seed=90 + HEAD_KINDS.index(kind))
    prefix, lens, limits = random_batch(lm, 30, 900, max_new=20)
    beam = search(lm, prefix, lens, limits, "mtp-beam", beam_size=1, threshold=threshold)
    want = generate(lm, prefix, lens, "mtp-threshold", threshold=threshold, max_new_tokens=limits)
    assert [h.tokens for h in beam.hyps] == [h.tokens for h in want.hyps]
    assert [h.decoder_calls for h in beam.hyps] == [h.decoder_calls for h in want.hyps]
    assert [h.finished for h in beam.hyps] == [h.finished for h in want.hyps]
    assert beam.batch_calls == want.batch_calls
    assert beam.accepted_per_head == want.accepted_per_head
    assert all(len(hs) == 1 for hs in beam.nbest)


# ---- exactness, scores, length handling -------------------------------------------------------------------------

@torch.no_grad()
def teacher_forced(lm, prompt, tokens, finished):
    """Per head k (0-based), the log-probabilities at every position of `[prompt] tokens`: row j is the state after
    j transcript tokens. Also returns the scored sequence (tokens, then EOS when finished)."""
    seq = torch.cat([prompt, lm.embed(torch.tensor(tokens, dtype=torch.long)).to(prompt.dtype)])
    first = prompt.shape[0] - 1
    scored = list(tokens) + ([lm.eos_id] if finished else [])
    labels = torch.zeros(1, len(seq), dtype=torch.long)  # head 1's targets: what hydra heads are conditioned on
    labels[0, first: first + len(scored)] = torch.tensor(scored, dtype=torch.long)
    states = lm.trunk(seq[None], torch.tensor([prompt.shape[0]]), labels)
    logps = [torch.log_softmax(lm.heads.logits(lm.decoder, k, states[k][0, first:]), -1) for k in range(len(states))]
    return logps, scored


@pytest.mark.parametrize("length_norm", [0.0, 1.0])
def test_beam_is_exact_when_the_beam_covers_the_search_space(length_norm):
    """Vocabulary 5 (4 tokens besides EOS), at most 3 tokens: 1 + 4 + 16 sequences end with EOS and 64 stop at the
    limit. A beam of 100 never prunes, so its N-best list must be every sequence, ranked as brute force ranks them."""
    lm = tiny_lm("latent", num_heads=1, vocab=5, seed=3)
    limit = 3
    prefix, lens, _ = random_batch(lm, 4, 1000, max_new=12)
    out = search(lm, prefix, lens, torch.full((4,), limit), "beam", beam_size=100, nbest=85,
                 length_norm=length_norm)
    others = [t for t in range(5) if t != EOS]
    for r in range(4):
        prompt = prefix[r, : lens[r]]
        brute = []
        for n in range(limit + 1):
            for tokens in itertools.product(others, repeat=n):
                finished = n < limit
                logps, scored = teacher_forced(lm, prompt, list(tokens), finished)
                total = sum(float(logps[0][j, t]) for j, t in enumerate(scored))
                brute.append((list(tokens), finished, total / len(scored) ** length_norm))
        brute.sort(key=lambda b: -b[2])
        got = [(h.tokens, h.finished, h.norm_score) for h in out.nbest[r]]
        assert len(got) == len(brute) == 85
        assert [g[:2] for g in got] == [b[:2] for b in brute]
        assert [g[2] for g in got] == pytest.approx([b[2] for b in brute], abs=1e-9)


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("rate", [0.0, 1.7], ids=["consecutive", "aligned"])
def test_nbest_scores_match_teacher_forced_rescoring(kind, rate):
    """Each reported per-token score is head k's log-probability of the token at the recorded position, recomputed
    with one full forward pass; totals, normalised scores, order and endings are consistent."""
    lm = tiny_lm(kind, num_heads=4, seed=110 + HEAD_KINDS.index(kind), prefix_rate=rate)
    prefix, lens, limits = random_batch(lm, 12, 1100, max_new=16)
    length_norm = 0.7
    out = search(lm, prefix, lens, limits, "mtp-beam", beam_size=4, threshold=0.1, length_norm=length_norm)
    heads_used = set()
    for r, hs in enumerate(out.nbest):
        assert 1 <= len(hs) <= 4
        assert len({(tuple(h.tokens), h.finished) for h in hs}) == len(hs), "no two hypotheses share a sequence"
        norms = [h.norm_score for h in hs]
        assert norms == sorted(norms, reverse=True)
        assert out.hyps[r].tokens == hs[0].tokens
        for h in hs:
            logps, scored = teacher_forced(lm, prefix[r, : lens[r]], h.tokens, h.finished)
            assert len(h.token_scores) == len(h.heads) == len(h.positions) == len(scored)
            assert h.finished or len(h.tokens) == limits[r]
            for i, (tok, lp, head, pos) in enumerate(zip(scored, h.token_scores, h.heads, h.positions)):
                assert pos + head - 1 == i  # head k from the state after j tokens scores token j + k
                assert lp == pytest.approx(float(logps[head - 1][pos, tok]), abs=1e-9)
                heads_used.add(head)
            assert h.score == pytest.approx(sum(h.token_scores), abs=1e-12)
            assert h.norm_score == pytest.approx(h.score / len(scored) ** length_norm, abs=1e-12)
    assert heads_used == {1, 2, 3, 4}


@torch.no_grad()
def table_model(tables: dict, V: int = 16):
    """One-hot embeddings and a layer that adds nothing, so head 1's distribution depends only on the current token:
    tables[t] = {next token: probability}, the rest spread evenly (tokens without a table: uniform)."""
    lm = tiny_lm("linear", num_heads=1, vocab=V, dim=V, n_layers=1, n_heads=1, n_kv_heads=None, randomize=False)
    dec = lm.decoder
    dec.embed_tokens.weight.copy_(torch.eye(V))
    dec.layers[0].self_attn.o_proj.weight.zero_()
    dec.layers[0].mlp.down_proj.weight.zero_()
    dec.lm_head.weight.zero_()
    for t, probs in tables.items():
        rest = (1 - sum(probs.values())) / (V - len(probs))
        for nxt in range(V):
            # logits are about 4 x weight: the RMSNorm of a one-hot vector of width 16 is 4 (less its epsilon)
            dec.lm_head.weight[nxt, t] = math.log(probs.get(nxt, rest)) / 4
    return lm


def test_length_normalisation_does_not_prefer_early_eos():
    """After the prompt, EOS has probability 0.35 and token 4 0.6; then 4 -> 5 -> ... -> 12 -> EOS, each 0.9.
    The empty transcript has the higher total (log 0.35 = -1.05 against -1.35 for ten tokens) but the far lower
    per-token average; greedy takes the long one too."""
    tables = {3: {EOS: 0.35, 4: 0.6}} | {t: {t + 1: 0.9} for t in range(4, 12)} | {12: {EOS: 0.9}}
    lm = table_model(tables)
    prefix = lm.embed(torch.tensor([[1, 3]]))
    lens, limit = torch.tensor([2]), torch.tensor([30])
    chain = list(range(4, 13))
    assert generate(lm, prefix, lens, "greedy", max_new_tokens=limit).hyps[0].tokens == chain
    normalised = search(lm, prefix, lens, limit, "beam", beam_size=4)
    assert normalised.hyps[0].tokens == chain and normalised.hyps[0].finished
    assert normalised.nbest[0][0].score == pytest.approx(math.log(0.6) + 9 * math.log(0.9), abs=1e-3)
    plain_sum = search(lm, prefix, lens, limit, "beam", beam_size=4, length_norm=0.0)
    assert plain_sum.hyps[0].tokens == [] and plain_sum.hyps[0].finished  # what normalising prevents
    assert plain_sum.nbest[0][1].tokens == chain


def test_argument_errors():
    lm = tiny_lm(num_heads=2)
    prefix, lens, _ = random_batch(lm, 2, 0, max_new=12)
    with pytest.raises(ValueError, match="unknown beam search method"):
        beam_search(lm, prefix, lens, "greedy")
    with pytest.raises(ValueError, match="--num-heads must be in 1..2"):
        beam_search(lm, prefix, lens, "mtp-beam", num_heads=3)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(lm, prefix, lens, "beam", beam_size=0)
    with pytest.raises(ValueError, match="nbest"):
        beam_search(lm, prefix, lens, "beam", beam_size=2, nbest=3)
    with pytest.raises(ValueError, match="threshold"):
        beam_search(lm, prefix, lens, "mtp-beam", threshold=-1)
    with pytest.raises(ValueError, match="length_norm"):
        beam_search(lm, prefix, lens, "beam", length_norm=-0.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        beam_search(lm, prefix, lens, "beam", max_new_tokens=torch.tensor([0, 3]))


# ---- a briefly trained model: confident heads, blocks that save calls ---------------------------------------------

def test_mtp_beam_saves_calls_on_a_trained_model():
    lm, prefix, lens = trained_counting_lm(rows=100)
    firsts = counting_firsts(100)
    limits = torch.full((100,), 15)
    truth = [c[1:] for c in counting_task(firsts.tolist())]
    beam = search(lm, prefix, lens, limits, "beam", beam_size=4)
    mtp = search(lm, prefix, lens, limits, "mtp-beam", beam_size=4, threshold=0.5)
    right = [sum(h.tokens == t for h, t in zip(out.hyps, truth)) for out in (beam, mtp)]
    calls = [sum(h.decoder_calls for h in out.hyps) for out in (beam, mtp)]
    print(f"beam: {right[0]}/100 right, {calls[0]} calls; mtp-beam: {right[1]}/100 right, {calls[1]} calls, "
          f"tokens per head {mtp.accepted_per_head}")
    assert right[1] >= right[0] - 2
    assert calls[1] < 0.6 * calls[0]


# ---- the command line: result files, N-best file, summaries, benchmark rows --------------------------------------

def test_decode_and_benchmark_commands(tmp_path):
    from lhotse import load_manifest
    from train_fixtures import make_corpus

    from mtp_asr.cli import main
    from mtp_asr.data.tokenizer import Tokenizer

    corpus = make_corpus(tmp_path / "corpus", n_train=4, n_valid=5)
    ckpt = speech_checkpoint(tmp_path / "exp" / "epoch-1.pt", corpus["tokenizer"])
    out = tmp_path / "out"
    args = ["decode", "--checkpoint", str(ckpt), "--cuts", str(corpus["valid"]), "--method", "mtp-beam",
            "--beam-size", "3", "--nbest", "2", "--threshold", "0.2", "--threshold", "0.9", "--batch-size", "2",
            "--device", "cpu", "--out-dir", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for tau in ("0.2", "0.9"):
        suffix = f"valid-epoch-1-mtp-beam-tau{tau}-B3-bs2"
        for stem in ("recogs", "errs", "wer-summary"):
            assert (out / f"{stem}-{suffix}.txt").is_file()
        summary = json.loads((out / f"summary-{suffix}.json").read_text())
        assert (summary["method"], summary["beam_size"], summary["threshold"]) == ("mtp-beam", 3, float(tau))
        lines = [json.loads(line) for line in (out / f"nbest-{suffix}.jsonl").read_text().splitlines()]
        assert [e["cut_id"] for e in lines] == sorted(c.id for c in load_manifest(corpus["valid"]))
        assert sum(e["decoder_calls"] for e in lines) == summary["num_decoder_calls"]
        for e in lines:
            assert 1 <= len(e["hyps"]) <= 2
            assert [h["norm_score"] for h in e["hyps"]] == sorted((h["norm_score"] for h in e["hyps"]), reverse=True)
            assert e["hyps"][0]["text"] == Tokenizer(corpus["tokenizer"]).decode(e["hyps"][0]["tokens"])
    assert list(out.glob("tradeoff-valid-epoch-1-mtp-beam-B3-bs2.png"))

    # beam-search options are refused for the other methods
    refused = CliRunner().invoke(main, args[:5] + ["--method", "greedy", "--beam-size", "3", "--out-dir", str(out)])
    assert refused.exit_code != 0 and "--beam-size" in refused.output

    # a draft tree: its own result files and summary field; wrong widths for the model are refused by name
    args = ["decode", "--checkpoint", str(ckpt), "--cuts", str(corpus["valid"]), "--method", "mtp-verify",
            "--draft-tree", "2,2", "--batch-size", "2", "--device", "cpu", "--out-dir", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 0
    summary = json.loads((out / "summary-valid-epoch-1-mtp-verify-tree2x2-bs2.json").read_text())
    assert summary["draft_tree"] == "2,2"
    wrong = CliRunner().invoke(main, args[:8] + ["2,2,2"] + args[9:])
    assert wrong.exit_code != 0 and "--draft-tree) reaches depth 3" in wrong.output

    bench = tmp_path / "bench"
    result = CliRunner().invoke(main, ["benchmark", "--checkpoint", str(ckpt), "--cuts", str(corpus["valid"]),
                                       "--batch-sizes", "2", "--threshold", "0.5", "--beam-size", "2", "--device",
                                       "cpu", "--num-threads", "1", "--max-draft", "4", "--max-draft", "32",
                                       "--draft-branches", "1", "--draft-branches", "2", "--draft-tree", "3,2",
                                       "--ctc-weight", "0.5", "--out-dir", str(bench)])
    assert result.exit_code == 0, result.output
    rows = json.loads((bench / "benchmark.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["greedy", "mtp-threshold-tau0.5", "mtp-verify", "mtp-verify-tree3x2",
                                           "ctc-verify-D4", "ctc-verify-D4-tree3x2", "ctc-verify-D4-br2",
                                           "ctc-verify-D4-br2-tree3x2", "ctc-verify-D32", "ctc-verify-D32-tree3x2",
                                           "ctc-verify-D32-br2", "ctc-verify-D32-br2-tree3x2", "ctc-rescore-w0.5",
                                           "beam-B2", "mtp-beam-tau0.5-B2", "mtp-beam-verify-B2",
                                           "beam-ctc0.5-B2", "mtp-beam-verify-ctc0.5-B2"]
    for name in ("mtp-verify-tree3x2", "ctc-verify-D4", "ctc-verify-D4-tree3x2", "ctc-verify-D4-br2-tree3x2",
                 "ctc-verify-D32"):
        assert next(r for r in rows if r["method"] == name)["same_as_greedy"] == 1.0


def test_benchmark_repeats_report_median_seconds(tmp_path):
    """--repeats R runs the method list R times in turn; each row keeps its R timings and reports their median, and
    the speed-up is the ratio of medians."""
    import statistics

    from train_fixtures import make_corpus

    from mtp_asr.cli import main

    corpus = make_corpus(tmp_path / "corpus", n_train=4, n_valid=3)
    ckpt = speech_checkpoint(tmp_path / "exp" / "epoch-1.pt", corpus["tokenizer"])
    bench = tmp_path / "bench"
    result = CliRunner().invoke(main, ["benchmark", "--checkpoint", str(ckpt), "--cuts", str(corpus["valid"]),
                                       "--batch-sizes", "1", "--device", "cpu", "--num-threads", "1",
                                       "--repeats", "3", "--out-dir", str(bench)])
    assert result.exit_code == 0, result.output
    info = json.loads((bench / "benchmark.json").read_text())
    assert info["repeats"] == 3
    greedy = info["rows"][0]
    for row in info["rows"]:
        rounds = row["decoder_seconds_per_round"]
        assert len(rounds) == 3 and min(rounds) > 0
        assert row["decoder_seconds"] == pytest.approx(statistics.median(rounds), abs=1e-4)
        assert row["speedup_seconds"] == pytest.approx(greedy["decoder_seconds"] / row["decoder_seconds"], rel=1e-2)
    assert "median of 3 rounds" in (bench / "benchmark.md").read_text()
    refused = CliRunner().invoke(main, ["benchmark", "--checkpoint", str(ckpt), "--cuts", str(corpus["valid"]),
                                        "--repeats", "0", "--out-dir", str(bench)])
    assert refused.exit_code != 0 and "--repeats" in refused.output


def test_sweep_plot_reuses_a_fresh_greedy_summary(tmp_path, monkeypatch):
    """A threshold sweep's plot takes greedy's point from the summary `decode` wrote beside it when that summary is
    newer than the checkpoint, and decodes greedy again otherwise."""
    import os

    from train_fixtures import make_corpus

    import mtp_asr.decode.run as run
    from mtp_asr.cli import main

    corpus = make_corpus(tmp_path / "corpus", n_train=4, n_valid=3)
    ckpt = speech_checkpoint(tmp_path / "exp" / "epoch-1.pt", corpus["tokenizer"])
    decoded = []
    real = run.decode_cuts
    monkeypatch.setattr(run, "decode_cuts", lambda m, t, cuts, settings, *a, **k: (
        decoded.append(settings.method), real(m, t, cuts, settings, *a, **k))[1])

    def decode(method, *extra):
        result = CliRunner().invoke(main, ["decode", "--checkpoint", str(ckpt), "--cuts", str(corpus["valid"]),
                                           "--method", method, *extra, "--device", "cpu",
                                           "--out-dir", str(tmp_path / "dec" / method)])
        assert result.exit_code == 0, result.output

    decode("greedy")
    sweep = ["--threshold", "0.3", "--threshold", "0.9"]
    decoded.clear()
    decode("mtp-threshold", *sweep)
    assert decoded == ["mtp-threshold", "mtp-threshold"]
    assert (tmp_path / "dec" / "mtp-threshold" / "tradeoff-valid-epoch-1-mtp-threshold-bs16.png").is_file()

    later = ckpt.stat().st_mtime + 10  # the checkpoint is now newer than greedy's summary
    os.utime(ckpt, (later, later))
    decoded.clear()
    decode("mtp-threshold", *sweep)
    assert decoded == ["mtp-threshold", "mtp-threshold", "greedy"]
