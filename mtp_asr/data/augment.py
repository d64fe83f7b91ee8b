"""SpecAugment (Park et al. 2019) on padded feature batches: frequency and time masks filled with the utterance's
mean, drawn from torch's RNG (so a resumed run, which restores that RNG, masks exactly as the uninterrupted one)."""
from dataclasses import dataclass

import torch


@dataclass
class SpecAugmentConfig:
    enabled: bool = True
    num_freq_masks: int = 2
    max_freq_width: int = 15
    frames_per_time_mask: int = 100  # one time mask per this many frames (at least one)
    max_time_width: int = 40
    max_time_fraction: float = 0.1  # a time mask covers at most this fraction of the utterance

    def __post_init__(self):
        if self.frames_per_time_mask < 1:
            raise ValueError(f"spec_augment.frames_per_time_mask must be >= 1 (got {self.frames_per_time_mask}); "
                             "spec_augment.enabled: false turns SpecAugment off")
        if min(self.num_freq_masks, self.max_freq_width, self.max_time_width) < 0 or self.max_time_fraction < 0:
            raise ValueError("spec_augment widths, counts and max_time_fraction must be >= 0")


def _randint(high: int) -> int:
    """Uniform in [0, high] inclusive."""
    return int(torch.randint(0, max(high, 0) + 1, ()).item())


def spec_augment(feats: torch.Tensor, lens: torch.Tensor, cfg: SpecAugmentConfig) -> torch.Tensor:
    if not cfg.enabled:
        return feats
    out = feats.clone()
    F = feats.shape[2]
    for b, n in enumerate(lens.tolist()):
        fill = out[b, :n].mean()
        for _ in range(cfg.num_freq_masks):
            w = _randint(min(cfg.max_freq_width, F))
            f0 = _randint(F - w)
            out[b, :n, f0: f0 + w] = fill
        max_w = min(cfg.max_time_width, int(n * cfg.max_time_fraction))
        for _ in range(max(1, n // cfg.frames_per_time_mask)):
            w = _randint(max_w)
            t0 = _randint(n - w)
            out[b, t0: t0 + w] = fill
    return out
