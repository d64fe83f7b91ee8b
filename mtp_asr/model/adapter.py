"""Adapter: stacks n consecutive encoder frames and projects them to the decoder width ("audial embeddings")."""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class AdapterConfig:
    stack: int = 4  # encoder frames per audio embedding
    hidden_dim: Optional[int] = None  # None: the decoder width

    def __post_init__(self):
        if self.stack < 1:
            raise ValueError(f"adapter.stack must be >= 1 (got {self.stack})")


class Adapter(nn.Module):
    def __init__(self, cfg: AdapterConfig, enc_dim: int, dec_dim: int):
        super().__init__()
        self.stack = cfg.stack
        hidden = cfg.hidden_dim or dec_dim
        self.proj = nn.Sequential(nn.Linear(cfg.stack * enc_dim, hidden), nn.GELU(), nn.Linear(hidden, dec_dim))

    def forward(self, frames: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        B, T, D = frames.shape
        pad = (-T) % self.stack
        if pad:
            frames = F.pad(frames, (0, 0, 0, pad))
        stacked = frames.reshape(B, (T + pad) // self.stack, self.stack * D)
        return self.proj(stacked), torch.div(lengths + self.stack - 1, self.stack, rounding_mode="floor")
