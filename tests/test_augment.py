"""SpecAugment on padded batches: masks stay inside each utterance, fill with its mean, follow torch's RNG."""
import pytest
import torch

from mtp_asr.data.augment import SpecAugmentConfig, spec_augment


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([300, 120, 45])
    feats = torch.randn(3, 300, 80, generator=g) * 3 - 7
    for b, n in enumerate(lens.tolist()):
        feats[b, n:] = 0.0  # padding, as pad_features leaves it
    return feats, lens


def test_masks_stay_inside_each_utterance_and_fill_with_its_mean():
    feats, lens = batch()
    cfg = SpecAugmentConfig()
    torch.manual_seed(1)
    out = spec_augment(feats, lens, cfg)
    assert not torch.equal(out, feats) and torch.equal(feats, batch()[0])  # the input is not modified
    for b, n in enumerate(lens.tolist()):
        assert torch.equal(out[b, n:], feats[b, n:])  # padding untouched
        changed = out[b, :n] != feats[b, :n]
        assert changed.any()
        assert torch.all(out[b, :n][changed] == feats[b, :n].mean())
        # Time masks: whole frames, at most max(1, n // frames_per_time_mask) of them, each within the width limits.
        whole = changed.all(dim=1).sum().item()
        assert whole <= max(1, n // cfg.frames_per_time_mask) * min(cfg.max_time_width, int(n * cfg.max_time_fraction))
        # Frequency masks: whole bins, at most num_freq_masks x max_freq_width of them.
        assert changed.all(dim=0).sum().item() <= cfg.num_freq_masks * cfg.max_freq_width


def test_masks_follow_torch_rng_and_can_be_turned_off():
    feats, lens = batch()
    torch.manual_seed(5)
    a = spec_augment(feats, lens, SpecAugmentConfig())
    torch.manual_seed(5)
    b = spec_augment(feats, lens, SpecAugmentConfig())
    assert torch.equal(a, b)
    assert spec_augment(feats, lens, SpecAugmentConfig(enabled=False)) is feats
    with pytest.raises(ValueError, match="frames_per_time_mask must be >= 1"):
        SpecAugmentConfig(frames_per_time_mask=0)
