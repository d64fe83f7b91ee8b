"""Joint CTC/attention decoding: the CTC prefix scores against brute-force enumeration, the searches' scores against
an independent recomputation, the reductions (weight 0: plain beam; mtp-beam-verify with one head: joint beam), a CTC
head that steers the search, and the option through decode_cuts and the command line."""
import itertools
import json

import pytest
import torch
from click.testing import CliRunner

from model_fixtures import EOS, random_batch, single_thread, tiny_lm, trained_counting_lm  # noqa: F401
from mtp_asr.decode.beam import beam_search
from mtp_asr.decode.ctc_prefix import CTCPrefixScorer
from mtp_asr.decode.rescore import ctc_sequence_log_probs
from mtp_asr.decode.verify_beam import verify_beam_search
from test_ctc_rescore import peaky_ctc, reference_scores


def brute_prefix(log_probs: torch.Tensor, prefix: list, labels: list, blank: int) -> float:
    """log of the summed probability of every label sequence (up to T labels) that starts with `prefix`."""
    T = log_probs.shape[0]
    seqs = [list(s) for n in range(T + 1) for s in itertools.product(labels, repeat=n) if list(s[: len(prefix)])
            == prefix]
    return torch.logsumexp(ctc_sequence_log_probs(log_probs, seqs, blank), 0).item()


def test_prefix_scores_equal_brute_force():
    # Labels 0, 1 and the decoder's EOS (2, a label the CTC head has too), blank 3; the second row has 4 frames.
    g = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(2 * torch.randn(2, 6, 4, generator=g, dtype=torch.float64), -1)
    lens = torch.tensor([6, 4])
    scorer = CTCPrefixScorer(log_probs, lens, blank=3, eos=2)
    state, paths = scorer.initial(), [[], []]
    for step in range(3):
        tokens = torch.tensor([[0, 1, 2]] * 2)
        added, extended = scorer.extend(state, tokens)
        for r in range(2):
            rows = log_probs[r, : lens[r]]
            for j, c in enumerate((0, 1)):
                expected = brute_prefix(rows, paths[r] + [c], [0, 1, 2], 3)
                assert state.prefix[r].item() + added[r, j].item() == pytest.approx(expected, abs=1e-9)
            whole = ctc_sequence_log_probs(rows, [paths[r]], 3)[0].item()  # EOS: the path as the whole sequence
            assert state.prefix[r].item() + added[r, 2].item() == pytest.approx(whole, abs=1e-9)
        # Row 0 repeats its label (0, 0, ...: the rule that needs a blank between), row 1 alternates.
        picks = [0, step % 2]
        state = extended.select(torch.tensor([0 * 3 + picks[0], 1 * 3 + picks[1]]))
        for r in range(2):
            paths[r].append(picks[r])


def test_a_prefix_the_frames_cannot_hold_is_improbable_not_impossible():
    log_probs = torch.log_softmax(torch.zeros(1, 2, 4, dtype=torch.float64), -1)  # 2 frames: at most 2 labels
    scorer = CTCPrefixScorer(log_probs, torch.tensor([2]), blank=3, eos=2)
    state = scorer.initial()
    for _ in range(3):
        added, extended = scorer.extend(state, torch.tensor([[0, 1]]))
        state = extended.select(torch.tensor([1]))
    assert torch.isfinite(state.prefix).all() and state.prefix.item() < -1e9


def spelling_ctc(targets: list, vocab: int, frames_per_label: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, vocab + 1) CTC log-probabilities that spell each target (label frames, then blanks) almost surely."""
    T = max(len(t) for t in targets) * frames_per_label + 1
    out = torch.full((len(targets), T, vocab + 1), 0.001)
    out[..., vocab] = 1.0  # blank everywhere else
    for r, target in enumerate(targets):
        for i, tok in enumerate(target):
            out[r, i * frames_per_label, tok], out[r, i * frames_per_label, vocab] = 1.0, 0.001
    return torch.log(out / out.sum(-1, keepdim=True)), torch.full((len(targets),), T)


@pytest.mark.parametrize("method,kind", [("beam", "latent"), ("mtp-beam-verify", "hydra"),
                                         ("mtp-beam-verify", "linear")])
def test_joint_scores_are_the_weighted_sums(method, kind):
    lm, prefix, prefix_lens = trained_counting_lm(kind, rows=3)  # hypotheses that end, with EOS
    V = lm.decoder.cfg.vocab_size
    g = torch.Generator().manual_seed(6)  # an unsure CTC head: every short sequence fits
    log_probs = torch.log_softmax(0.5 * torch.randn(3, 16, V + 1, generator=g, dtype=torch.float64), -1)
    lens = torch.tensor([16, 13, 12])
    weight = 0.4
    with torch.no_grad():
        scorer = CTCPrefixScorer(log_probs, lens, V, EOS)
        if method == "beam":
            out = beam_search(lm, prefix, prefix_lens, "beam", max_new_tokens=10, beam_size=3, ctc=scorer,
                              ctc_weight=weight)
        else:
            out = verify_beam_search(lm, prefix, prefix_lens, None, 10, 3, ctc=scorer, ctc_weight=weight)
        checked = 0
        for r, hyps in enumerate(out.nbest):
            for h in hyps:
                if not h.finished:  # a hypothesis cut at the length limit has no EOS term
                    continue
                decoder = reference_scores(lm, prefix, prefix_lens, [r], [h.tokens])[0].item()
                ctc = ctc_sequence_log_probs(log_probs[r, : lens[r]].double(), [h.tokens], V)[0].item()
                assert h.score == pytest.approx((1 - weight) * decoder + weight * ctc, abs=1e-4)
                checked += 1
    assert checked >= 4


def test_reductions():
    lm = tiny_lm("hydra", num_heads=3)
    prefix, prefix_lens, _ = random_batch(lm, 4, seed=7)
    V = lm.decoder.cfg.vocab_size
    log_probs, lens = torch.stack([peaky_ctc(12, V, s) for s in range(4)]), torch.tensor([12, 12, 10, 7])
    with torch.no_grad():
        scorer = CTCPrefixScorer(log_probs, lens, V, EOS)
        # With weight 0 the CTC term reorders nothing: plain beam search.
        plain = beam_search(lm, prefix, prefix_lens, "beam", max_new_tokens=10, beam_size=3)
        zero = beam_search(lm, prefix, prefix_lens, "beam", max_new_tokens=10, beam_size=3, ctc=scorer, ctc_weight=0)
        assert [[h.tokens for h in hs] for hs in zero.nbest] == [[h.tokens for h in hs] for hs in plain.nbest]
        # mtp-beam-verify with one head is joint beam search: the same N-best lists and calls.
        joint = beam_search(lm, prefix, prefix_lens, "beam", max_new_tokens=10, beam_size=3, ctc=scorer,
                            ctc_weight=0.5)
        one_head = verify_beam_search(lm, prefix, prefix_lens, 1, 10, 3, ctc=scorer, ctc_weight=0.5)
    assert [[(h.tokens, round(h.score, 6)) for h in hs] for hs in one_head.nbest] == \
        [[(h.tokens, round(h.score, 6)) for h in hs] for hs in joint.nbest]
    assert [h.decoder_calls for h in one_head.hyps] == [h.decoder_calls for h in joint.hyps]
    assert [[h.tokens for h in hs] for hs in joint.nbest] != [[h.tokens for h in hs] for hs in plain.nbest]
    with pytest.raises(ValueError, match="built for `beam` only"):
        beam_search(lm, prefix, prefix_lens, "mtp-beam", ctc=scorer, ctc_weight=0.5)


@pytest.mark.parametrize("method", ["beam", "mtp-beam-verify"])
def test_the_ctc_head_steers_the_search(method):
    """A CTC head sure of a transcript the (random) decoder does not favour: with the pre-beam covering the
    vocabulary and most of the weight on CTC, the search emits that transcript; without CTC it does not."""
    lm = tiny_lm("hydra", num_heads=3)
    prefix, prefix_lens, _ = random_batch(lm, 2, seed=9)
    V = lm.decoder.cfg.vocab_size
    targets = [[3, 7, 7, 12, 5], [15, 4, 9]]
    log_probs, lens = spelling_ctc(targets, V)
    with torch.no_grad():
        scorer = CTCPrefixScorer(log_probs, lens, V, EOS)
        search = beam_search if method == "beam" else verify_beam_search
        args = ("beam",) if method == "beam" else (None,)
        joint = search(lm, prefix, prefix_lens, *args, max_new_tokens=10, beam_size=V, ctc=scorer, ctc_weight=0.9)
        plain = search(lm, prefix, prefix_lens, *args, max_new_tokens=10, beam_size=4)
    assert [h.tokens for h in joint.hyps] == targets
    assert [h.tokens for h in plain.hyps] != targets


def test_decode_joint(small_corpus, small_checkpoint, tmp_path):
    from mtp_asr.cli import main
    from mtp_asr.data.dataset import read_cuts
    from mtp_asr.decode.runner import DecodeSettings, decode_cuts
    from mtp_asr.model.build import load_speech_model

    model, tokenizer, _ = load_speech_model(small_checkpoint)
    cuts = read_cuts(small_corpus["valid"])
    for method in ("beam", "mtp-beam-verify"):
        settings = DecodeSettings(method, beam_size=2, ctc_weight=0.5)
        res = decode_cuts(model, tokenizer, cuts, settings, 3)
        assert len(res.results) == len(cuts) and res.summary()["ctc_weight"] == 0.5
        assert "-ctc0.5-" in settings.label()
    assert DecodeSettings("beam").ctc_weight == 0.0 and not DecodeSettings("beam").joint_ctc
    assert DecodeSettings("ctc-rescore").ctc_weight == 0.5
    with pytest.raises(ValueError, match="--ctc-weight applies to ctc-rescore, beam and mtp-beam-verify only"):
        DecodeSettings("mtp-beam", ctc_weight=0.5)
    model.ctc_tokenizer = tokenizer  # a CTC head with a vocabulary of its own: its labels are not the decoder's
    with pytest.raises(ValueError, match="vocabulary of its own"):
        decode_cuts(model, tokenizer, cuts, DecodeSettings("beam", ctc_weight=0.5), 3)

    out = tmp_path / "out"
    args = ["decode", "--checkpoint", str(small_checkpoint), "--cuts", str(small_corpus["valid"]), "--method",
            "beam", "--ctc-weight", "0.3", "--beam-size", "2", "--batch-size", "2", "--device", "cpu",
            "--out-dir", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (summary,) = [json.loads(p.read_text()) for p in out.glob("summary-*-beam-ctc0.3-B2-bs2.json")]
    assert summary["ctc_weight"] == 0.3 and summary["ctc_beam_size"] is None
    refused = CliRunner().invoke(main, args[:6] + ["mtp-beam"] + args[7:])
    assert refused.exit_code != 0 and "--ctc-weight" in refused.output
