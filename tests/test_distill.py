"""Self-distillation of MTP heads 2..K: labels from the model's own greedy output, only the heads change, greedy
transcripts stay the same and verification accepts more drafts."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from lhotse import load_manifest

from mtp_asr.cli import main
from mtp_asr.data.tokenizer import Tokenizer
from mtp_asr.decode.runner import DecodeSettings, decode_cuts
from mtp_asr.model.build import load_speech_model
from mtp_asr.model.lm import IGNORE
from mtp_asr.train.checkpoint import load_checkpoint
from mtp_asr.train.distill import FROZEN, agreement, cache_trunk, fit_heads
from mtp_asr.train.run import train_speech
from mtp_asr.train.trainer import freeze_parts

sys.path.insert(0, str(Path(__file__).parent))
from model_fixtures import randomize_, speech_checkpoint, tiny_speech_llama  # noqa: E402
from train_fixtures import make_corpus, tiny_train_config  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), n_train=24, n_valid=8)


def frozen_part(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("lm.heads.")}


def test_unfinished_hypotheses_get_no_eos_target(corpus):
    model = tiny_speech_llama(num_heads=3, vocab=24, feat_dim=80).eval()
    cuts = load_manifest(corpus["valid"]).subset(first=2)
    ids = [c.id for c in cuts]
    labels = {ids[0]: ([5, 6, 7], True), ids[1]: ([5, 6, 7], False)}
    (batch,) = cache_trunk(model, cuts, labels, batch_size=2)
    head1, head3 = batch.labels[0], batch.labels[2]
    for row, cut_id in enumerate(c.id for c in sorted(cuts, key=lambda c: (-c.duration, c.id))):
        kept = head1[row][head1[row] != IGNORE].tolist()
        finished = labels[cut_id][1]
        assert kept == ([5, 6, 7, model.cfg.eos_id] if finished else [5, 6, 7])
        # head 3 at y_1's position predicts y_3's successor: EOS, only where EOS is a target
        assert head3[row][head3[row] != IGNORE].tolist() == ([6, 7, model.cfg.eos_id][1:] if finished else [7])
    assert batch.hidden.shape[:2] == batch.positions.shape == head1.shape


@pytest.mark.parametrize("kind", ["latent", "linear", "medusa", "layer"])
def test_fitting_changes_only_heads_2_to_k_and_raises_agreement(corpus, kind):
    torch.manual_seed(0)
    model = tiny_speech_llama(kind=kind, num_heads=3, vocab=24, feat_dim=80).eval()
    freeze_parts(model, FROZEN)
    cuts = load_manifest(corpus["train"]).subset(first=8)
    labels = {c.id: (torch.randint(3, 24, (6,)).tolist(), True) for c in cuts}
    cached = cache_trunk(model, cuts, labels, batch_size=4)
    frozen = frozen_part(model)
    before = agreement(model.lm, cached)
    fit_heads(model.lm, cached, steps=60, lr=3e-2)
    after = agreement(model.lm, cached)
    assert all(a > b for a, b in zip(after, before)), (before, after)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


def test_soft_targets_are_head_1_where_it_chose_each_greedy_token(corpus):
    """Teacher-forced on the model's own greedy output, head 1's distribution at the soft target's position picks
    exactly the label of head k (so the offset is right); fitting those distributions brings heads 2..K closer to
    them (lower KL divergence)."""
    from mtp_asr.train.distill import _head_logits

    tokenizer = Tokenizer(corpus["tokenizer"])
    model = tiny_speech_llama(num_heads=3, vocab=tokenizer.vocab_size, feat_dim=80).eval()
    randomize_(model.lm, seed=0)  # peaked distributions: no near-ties between the cached and the teacher-forced pass
    freeze_parts(model, FROZEN)
    cuts = load_manifest(corpus["train"]).subset(first=6)
    greedy = decode_cuts(model, tokenizer, cuts, DecodeSettings("greedy", max_tokens_per_second=3.0), 3)
    labels = {c: (greedy.tokens[c], greedy.finished[c]) for c in greedy.tokens}
    assert sum(len(t) for t, _ in labels.values()) > 20
    cached = cache_trunk(model, cuts, labels, batch_size=3)
    for batch in cached:
        for logits, lab, teacher in _head_logits(model.lm, batch):
            assert torch.equal(teacher.argmax(-1), lab)

    def kl() -> float:
        with torch.no_grad():
            return sum(float(F.kl_div(lg.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum"))
                       for b in cached for lg, _, t in _head_logits(model.lm, b))

    before = kl()
    fit_heads(model.lm, cached, steps=40, lr=1e-2, soft_targets=True)
    assert kl() < 0.8 * before


def test_one_head_model_is_refused(corpus, tmp_path):
    ckpt = speech_checkpoint(tmp_path / "one-head.pt", corpus["tokenizer"], num_heads=1)
    out = tmp_path / "out.pt"
    result = CliRunner().invoke(main, ["distill-heads", "--checkpoint", str(ckpt), "--cuts", str(corpus["valid"]),
                                       "--out", str(out), "--device", "cpu"])
    assert result.exit_code != 0 and "no heads to distil" in result.output and str(ckpt) in result.output
    assert not out.exists()


def test_too_short_transcripts_leave_the_heads_unchanged(corpus, tmp_path, monkeypatch, caplog):
    """An untrained model that emits EOS at once gives heads 2..K nothing to learn: a warning, the model unchanged
    (a recipe goes on)."""
    import mtp_asr.train.distill as distill

    ckpt, out = speech_checkpoint(tmp_path / "model.pt", corpus["tokenizer"]), tmp_path / "out.pt"
    monkeypatch.setattr(distill, "self_labels", lambda m, t, cuts, bs: {c.id: ([5], True) for c in cuts})
    report = distill.distill_heads(ckpt, [corpus["valid"]], out, distill.DistillSettings(steps=5))
    assert report["steps"] == 0 and "nothing to learn" in caplog.text
    saved = load_checkpoint(out)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in load_checkpoint(ckpt)["model"].items())


def test_heads_that_fit_worse_are_not_kept(corpus, tmp_path, monkeypatch, caplog):
    """A fit that lowers the held-out agreement (here: one that scrambles the heads) hands back the original heads,
    with a warning; the report still gives both agreements."""
    import mtp_asr.train.distill as distill

    ckpt, out = speech_checkpoint(tmp_path / "model.pt", corpus["tokenizer"]), tmp_path / "out.pt"
    monkeypatch.setattr(distill, "self_labels", lambda m, t, cuts, bs: {c.id: ([5, 6, 7, 8] * 5, True) for c in cuts})
    calls, real_fit = [], distill.fit_heads

    def fit_then_break(lm, *args, **kwargs):
        real_fit(lm, *args, **kwargs)  # a real fit ...
        calls.append(sum(distill.agreement(lm, args[0])))
        with torch.no_grad():  # ... then break it, as a diverging fit would
            for p in lm.heads.parameters():
                p.mul_(-1.0)

    monkeypatch.setattr(distill, "fit_heads", fit_then_break)
    report = distill.distill_heads(ckpt, [corpus["valid"]], out, distill.DistillSettings(steps=20, lr=3e-2))
    assert len(calls) == 1 and report["heads"] == "original" and "keeps the original heads" in caplog.text
    assert sum(report["agreement_after"]) <= sum(report["agreement_before"])
    saved = load_checkpoint(out)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in load_checkpoint(ckpt)["model"].items())


@pytest.mark.slow
def test_distilled_heads_keep_greedy_output_and_save_decoder_calls(corpus, tmp_path):
    """A briefly trained model, its heads self-distilled through the CLI: every parameter outside heads 2..K is
    unchanged, greedy and mtp-verify transcripts are exactly the original greedy ones, and mtp-verify needs fewer
    decoder calls than with the heads trained on the references."""
    cfg = tiny_train_config(corpus, num_epochs=30)
    cfg["model"]["heads"]["num_heads"] = 3
    assert train_speech(cfg, tmp_path / "exp") == 0
    src, out = tmp_path / "exp" / "epoch-30.pt", tmp_path / "distilled.pt"
    result = CliRunner().invoke(main, ["distill-heads", "--checkpoint", str(src), "--cuts", str(corpus["train"]),
                                       "--out", str(out), "--steps", "300", "--batch-size", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = load_checkpoint(out)["distilled_heads"]
    assert report["num_cuts"] == 24 and report["steps"] == 300 and report["heads"] == "distilled"
    assert sum(report["agreement_after"]) > sum(report["agreement_before"]), report

    before, tokenizer, _ = load_speech_model(src)
    after, _, _ = load_speech_model(out)
    assert all(torch.equal(v, after.state_dict()[k]) for k, v in frozen_part(before).items())
    cuts = load_manifest(corpus["train"])
    greedy = decode_cuts(before, tokenizer, cuts, DecodeSettings("greedy"), 8).tokens
    verify_before = decode_cuts(before, tokenizer, cuts, DecodeSettings("mtp-verify"), 8)
    verify_after = decode_cuts(after, tokenizer, cuts, DecodeSettings("mtp-verify"), 8)
    assert decode_cuts(after, tokenizer, cuts, DecodeSettings("greedy"), 8).tokens == greedy
    assert verify_before.tokens == verify_after.tokens == greedy
    assert verify_after.num_decoder_calls < verify_before.num_decoder_calls
