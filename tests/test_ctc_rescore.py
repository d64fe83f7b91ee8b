"""ctc-rescore: the decoder's cached two-call scores against the uncached reference, the choice by combined score, the
length limit, and the method through decode_cuts and the command line."""
import json

import pytest
import torch
from click.testing import CliRunner

from model_fixtures import EOS, random_batch, single_thread, tiny_lm  # noqa: F401
from mtp_asr.decode.rescore import ctc_sequence_log_probs, decoder_log_probs, rescore_nbest
from mtp_asr.model.heads import HEAD_KINDS


def reference_scores(lm, prefix, prefix_lens, owner, seqs) -> torch.Tensor:
    """log p(seq, EOS) under head 1 by `score_sequences` (one uncached pass over prompt + sequence per row)."""
    idx = torch.tensor(owner)
    steps = [list(range(len(s) + 1)) for s in seqs]
    per_token = lm.score_sequences(prefix[idx], prefix_lens[idx], seqs, [[1] * len(s) for s in steps], steps)
    return torch.stack([t.double().sum() for t in per_token])


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_cached_decoder_scores_equal_the_uncached_reference(kind):
    lm = tiny_lm(kind, num_heads=2)
    prefix, prefix_lens, _ = random_batch(lm, 3, seed=1)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, 16, (n,), generator=g).tolist() for n in (5, 0, 9, 1, 7, 3)]
    owner = [0, 0, 1, 2, 2, 2]
    with torch.no_grad():
        expected = reference_scores(lm, prefix, prefix_lens, owner, seqs)
        got = decoder_log_probs(lm, prefix, prefix_lens, owner, seqs, chunk=4)  # chunks split the rows
        empty = decoder_log_probs(lm, prefix, prefix_lens, [0], [[]])  # seqs[1], of prompt 0, alone
    assert torch.allclose(got, expected, atol=1e-9)
    assert torch.allclose(empty, expected[1:2], atol=1e-9)


def peaky_ctc(T: int, V: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(3 * torch.randn(T, V + 1, generator=g, dtype=torch.float64), -1).float()


def test_the_combined_score_picks_the_hypothesis():
    lm = tiny_lm(num_heads=2)
    prefix, prefix_lens, _ = random_batch(lm, 2, seed=3)
    V = lm.decoder.cfg.vocab_size
    ctc = torch.stack([peaky_ctc(12, V, 0), peaky_ctc(12, V, 1)])
    ctc_lens = torch.tensor([12, 9])
    g = torch.Generator().manual_seed(4)
    nbest = [[(s, s) for s in (torch.randint(3, 16, (n,), generator=g).tolist() for n in (2, 4, 3, 5))]
             for _ in range(2)]
    limits = [8, 8]
    with torch.no_grad():
        for weight in (0.0, 0.3, 1.0):
            out = rescore_nbest(lm, prefix, prefix_lens, nbest, ctc, ctc_lens, V, weight, limits)
            for r, hyps in enumerate(nbest):
                seqs = [d for _, d in hyps]
                dec = reference_scores(lm, prefix, prefix_lens, [r] * len(seqs), seqs)
                c = ctc_sequence_log_probs(ctc[r, : ctc_lens[r]], seqs, V)
                assert out.hyps[r].tokens == seqs[int((weight * c + (1 - weight) * dec).argmax())]
                assert out.hyps[r].decoder_calls == 2 and out.hyps[r].finished
            assert out.batch_calls == 2
        # A hypothesis longer than its row's limit is never chosen; with none left, the first one is cut short.
        out = rescore_nbest(lm, prefix, prefix_lens, nbest, ctc, ctc_lens, V, 0.5, [3, 1])
        assert len(out.hyps[0].tokens) <= 3 and out.hyps[0].finished
        assert out.hyps[1].tokens == nbest[1][0][1][:1] and not out.hyps[1].finished


def test_ctc_sequence_log_probs_sum_over_alignments():
    # Two frames, one label a: alignments "a a", "a -", "- a" (p = 0.5 each frame for a and blank).
    log_probs = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    assert torch.allclose(ctc_sequence_log_probs(log_probs, [[0], []], blank=1),
                          torch.log(torch.tensor([0.75, 0.25], dtype=torch.float64)))


def test_decode_ctc_rescore(small_corpus, small_checkpoint, tmp_path):
    from train_fixtures import WORDS

    from mtp_asr.cli import main
    from mtp_asr.data.dataset import read_cuts
    from mtp_asr.decode.runner import DecodeSettings, decode_cuts
    from mtp_asr.model.build import load_speech_model

    words = tmp_path / "words.txt"
    words.write_text("\n".join(WORDS) + "\n")
    model, tokenizer, _ = load_speech_model(small_checkpoint)
    cuts = read_cuts(small_corpus["valid"])
    res = decode_cuts(model, tokenizer, cuts, DecodeSettings("ctc-rescore", lexicon=str(words), ctc_beam_size=4), 3)
    assert res.num_decoder_calls == 2 * len(cuts) and res.num_batch_calls == 4  # two batches, two calls each
    assert all(set(hyp.split()) <= set(WORDS) for _, _, hyp in res.results)
    # With the decoder's own transcripts added: greedy's (ctc-verify's calls, from the same CTC draft) or
    # mtp-beam-verify's N-best, plus the two calls of the rescoring.
    for n, own in ((1, DecodeSettings("ctc-verify", lexicon=str(words), ctc_beam_size=4)),
                   (2, DecodeSettings("mtp-beam-verify", lexicon=str(words), beam_size=2))):
        both = decode_cuts(model, tokenizer, cuts, DecodeSettings("ctc-rescore", lexicon=str(words), ctc_beam_size=4,
                                                                  rescore_beam=n), 3)
        alone = decode_cuts(model, tokenizer, cuts, own, 3)
        assert both.calls == {c: calls + 2 for c, calls in alone.calls.items()}
        assert both.summary()["rescore_beam"] == n
    with pytest.raises(ValueError, match="--rescore-beam applies to ctc-rescore only"):
        DecodeSettings("greedy", rescore_beam=1)
    out = tmp_path / "out"
    args = ["decode", "--checkpoint", str(small_checkpoint), "--cuts", str(small_corpus["valid"]), "--method",
            "ctc-rescore", "--ctc-weight", "0.3", "--ctc-beam-size", "4", "--batch-size", "2", "--device", "cpu",
            "--out-dir", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (summary,) = [json.loads(p.read_text()) for p in out.glob("summary-*-ctc-rescore-ctcB4-w0.3-bs2.json")]
    assert summary["ctc_weight"] == 0.3 and summary["ctc_beam_size"] == 4 and summary["num_decoder_calls"] == 8
    refused = CliRunner().invoke(main, args[:6] + ["greedy", "--ctc-weight", "0.3"] + args[11:])
    assert refused.exit_code != 0 and "--ctc-weight" in refused.output
    with pytest.raises(ValueError, match="--ctc-weight must be in"):
        DecodeSettings("ctc-rescore", ctc_weight=1.5)
