"""`mtp-beam-verify`: with one head it is `beam`, with beam size 1 it is `greedy` at `mtp-verify`'s calls, its scores
are head 1's (teacher-forced re-scoring), batching changes nothing, and it saves calls on a trained model."""
import pytest
import torch

from model_fixtures import random_batch, single_thread, tiny_lm, trained_counting_lm  # noqa: F401
from mtp_asr.decode.beam import beam_search
from mtp_asr.decode.generate import generate
from mtp_asr.decode.verify_beam import verify_beam_search
from mtp_asr.model.heads import HEAD_KINDS


def summary(out):
    return [[(h.tokens, h.finished) for h in hs] for hs in out.nbest]


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_one_head_is_beam_and_beam_one_is_greedy_at_verify_calls(kind):
    lm = tiny_lm(kind, num_heads=3, seed=110 + HEAD_KINDS.index(kind))
    prefix, lens, limits = random_batch(lm, 20, 1100, max_new=16)
    for beam_size in (1, 3):
        beam = beam_search(lm, prefix, lens, "beam", beam_size=beam_size, max_new_tokens=limits)
        one = verify_beam_search(lm, prefix, lens, num_heads=1, beam_size=beam_size, max_new_tokens=limits)
        assert summary(one) == summary(beam)
        assert [[h.score for h in hs] for hs in one.nbest] == [[h.score for h in hs] for hs in beam.nbest]
        assert [h.decoder_calls for h in one.hyps] == [h.decoder_calls for h in beam.hyps]
    greedy = generate(lm, prefix, lens, "greedy", max_new_tokens=limits)
    verify = generate(lm, prefix, lens, "mtp-verify", max_new_tokens=limits)
    single = verify_beam_search(lm, prefix, lens, beam_size=1, max_new_tokens=limits)
    assert [h.tokens for h in single.hyps] == [h.tokens for h in greedy.hyps]
    assert [h.finished for h in single.hyps] == [h.finished for h in greedy.hyps]
    assert [h.decoder_calls for h in single.hyps] == [h.decoder_calls for h in verify.hyps]


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_scores_are_head_one_and_batching_changes_nothing(kind):
    lm = tiny_lm(kind, num_heads=3, seed=120 + HEAD_KINDS.index(kind))
    prefix, lens, limits = random_batch(lm, 12, 1200, max_new=14)
    out = verify_beam_search(lm, prefix, lens, beam_size=3, max_new_tokens=limits)
    for r, hs in enumerate(out.nbest):
        p = prefix[r, : lens[r]]
        for h in hs:  # every token (and EOS) scored by head 1 from the state before it
            seq = torch.cat([p, lm.embed(torch.tensor(h.tokens, dtype=torch.long)).to(p.dtype)])
            states = lm.trunk(seq[None], lens[r:r + 1], torch.zeros(1, len(seq), dtype=torch.long))
            logp = torch.log_softmax(lm.heads.logits(lm.decoder, 0, states[0][0, p.shape[0] - 1:]), -1)
            scored = h.tokens + ([lm.eos_id] if h.finished else [])
            assert h.score == pytest.approx(sum(logp[j, t].item() for j, t in enumerate(scored)), abs=1e-9)
            assert h.heads == [1] * len(scored) and h.positions == list(range(len(scored)))
        alone = verify_beam_search(lm, prefix[r:r + 1, : lens[r]], lens[r:r + 1], beam_size=3,
                                   max_new_tokens=limits[r:r + 1])
        assert summary(alone) == [summary(out)[r]]
        assert alone.hyps[0].decoder_calls == out.hyps[r].decoder_calls


def test_saves_calls_on_a_trained_model():
    lm, prefix, lens = trained_counting_lm("hydra", num_heads=3, rows=32)
    beam = beam_search(lm, prefix, lens, "beam", beam_size=3, max_new_tokens=12)
    fast = verify_beam_search(lm, prefix, lens, beam_size=3, max_new_tokens=12)
    assert sum(h.decoder_calls for h in fast.hyps) < 0.7 * sum(h.decoder_calls for h in beam.hyps)  # 0.61x here
    assert [h.tokens for h in fast.hyps] == [h.tokens for h in beam.hyps]


def test_argument_errors():
    lm = tiny_lm("latent", num_heads=3)
    prefix, lens, limits = random_batch(lm, 2, 1300)
    for kw, message in (({"num_heads": 4}, "--num-heads must be in 1..3"), ({"beam_size": 0}, "beam_size must be"),
                        ({"nbest": 5, "beam_size": 4}, "nbest must be in 1..beam_size"),
                        ({"length_norm": -1}, "length_norm must be >= 0"), ({"max_new_tokens": 0}, ">= 1")):
        with pytest.raises(ValueError, match=message):
            verify_beam_search(lm, prefix, lens, **{"max_new_tokens": limits, **kw})
