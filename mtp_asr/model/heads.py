"""Multi-token-prediction heads: head k predicts token u+k from the trunk state at position u.

Head 1 is always the decoder's own LM head (final norm + un-embedding), so a model with K heads decodes greedily
exactly like its next-token model, and heads 2..K can be trained on a frozen trunk without changing that model.
The kinds differ in how heads 2..K turn the trunk state into logits (d = model width, V = vocabulary):

- `linear`: an independent d x V projection per head, initialised from the LM head (paper: "independent heads");
- `latent`: latent-space expansion, a d x d matrix A_k per head, then the shared un-embedding; A_k starts as the
  identity, so every head starts as the LM head (paper);
- `medusa`: a residual block h + SiLU(W_k h + b_k) per head (W_k starts at zero), then the shared un-embedding;
- `layer`: one extra transformer layer per head on the trunk's last hidden state, its own final norm, then the
  shared un-embedding (Gloeckle et al. 2024); these layers keep KV-cache slots after the trunk's.

A forward pass gives per-head states (what goes into each head's un-embedding) and logits are computed separately,
so decoding can project only the positions it needs.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from mtp_asr.model.llama import DecoderLayer, Geometry, KVCache, LlamaDecoder, RMSNorm, causal_geometry

HEAD_KINDS = ("linear", "latent", "medusa", "layer")


@dataclass
class HeadsConfig:
    num_heads: int = 1  # K; 1 is plain next-token prediction
    kind: str = "latent"
    # Loss weight per head (length K); None: 1.0 for every head.
    loss_weights: Optional[list] = field(default=None)

    def __post_init__(self):
        if self.num_heads < 1:
            raise ValueError(f"heads.num_heads must be >= 1 (got {self.num_heads})")
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"heads.kind must be one of {', '.join(HEAD_KINDS)} (got {self.kind!r})")
        if self.loss_weights is not None and len(self.loss_weights) != self.num_heads:
            raise ValueError(
                f"heads.loss_weights has {len(self.loss_weights)} values for {self.num_heads} heads"
            )

    @property
    def weights(self) -> list:
        return list(self.loss_weights) if self.loss_weights is not None else [1.0] * self.num_heads


class MTPHeads(nn.Module):
    """Heads 2..K on top of a `LlamaDecoder` (head 1 is the decoder's own `norm` + `lm_head`)."""

    def __init__(self, cfg: HeadsConfig, decoder: LlamaDecoder):
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.kind
        self.num_heads = cfg.num_heads
        d, V, extra = decoder.cfg.dim, decoder.cfg.vocab_size, cfg.num_heads - 1
        if self.kind == "linear":
            self.proj = nn.ModuleList(nn.Linear(d, V, bias=False) for _ in range(extra))
            for p in self.proj:
                p.weight.data.copy_(decoder.lm_head.weight.data)
        elif self.kind == "latent":
            self.latent = nn.ParameterList(nn.Parameter(torch.eye(d)) for _ in range(extra))
        elif self.kind == "medusa":
            self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(extra))
            for b in self.blocks:
                nn.init.zeros_(b.weight)
                nn.init.zeros_(b.bias)
        else:  # layer
            self.layers = nn.ModuleList(DecoderLayer(decoder.cfg) for _ in range(extra))
            self.norms = nn.ModuleList(RMSNorm(d, decoder.cfg.norm_eps) for _ in range(extra))
            for layer, norm in zip(self.layers, self.norms):
                layer.load_state_dict(decoder.layers[-1].state_dict())
                norm.load_state_dict(decoder.norm.state_dict())

    @property
    def num_cache_layers(self) -> int:
        """KV-cache layers these heads need after the trunk's."""
        return self.num_heads - 1 if self.kind == "layer" else 0

    def states(self, decoder: LlamaDecoder, hidden: Tensor, cache: Optional[KVCache] = None,
               geometry: Optional[Geometry] = None, positions: Optional[Tensor] = None, lazy: bool = False) -> list:
        """Per-head inputs to the un-embedding, [head 1, ..., head K], each (B, T, d), from the trunk output `hidden`
        (before the final norm). For `layer` heads with a cache, `geometry` must be the call's geometry; without
        one, `positions` are the rotary positions the trunk used (default 0..T-1). lazy: head 1's alone where the
        others are a function of it (every kind but `layer`), for `logits_at` to project only where needed."""
        normed = decoder.norm(hidden)
        if self.kind != "layer":
            return [normed] if lazy else [normed] + [self.project(k, normed) for k in range(1, self.num_heads)]
        out = [normed]
        if self.num_heads > 1:
            if cache is None:
                geometry = causal_geometry(hidden, positions)
            base = decoder.cfg.n_layers
            for j, (layer, norm) in enumerate(zip(self.layers, self.norms)):
                out.append(norm(layer(hidden, decoder.rotary, geometry, cache, base + j)))
        return out

    def project(self, head: int, normed: Tensor) -> Tensor:
        """State of head `head` (0-based, >= 1; not for `layer` heads) from the final-normed trunk state."""
        if self.kind == "latent":
            return normed @ self.latent[head - 1].T
        if self.kind == "medusa":
            return normed + nn.functional.silu(self.blocks[head - 1](normed))
        return normed  # linear: the head's own projection is in `logits`

    def logits_at(self, decoder: LlamaDecoder, states: list, index: tuple, heads: range) -> Tensor:
        """Logits (N, len(heads), V) of heads `heads` (0-based) at positions `index` of `states` (lazy or not). The
        shared un-embedding runs once for all of them: at decoding's few rows one product of 3 rows costs less than 3
        of one (about 40-60 us less per call at batch 1 on the demo's CPU, within the noise of a whole decode)."""
        first = states[0][index]
        per_head = [first if k == 0 else states[k][index] if k < len(states) else self.project(k, first)
                    for k in heads]
        if self.kind == "linear":
            return torch.stack([self.logits(decoder, k, s) for k, s in zip(heads, per_head)], -2)
        return decoder.lm_head(torch.stack(per_head, -2))

    def logits(self, decoder: LlamaDecoder, head: int, state: Tensor) -> Tensor:
        """Logits of head `head` (0-based: 0 is the LM head) from its state."""
        if self.kind == "linear" and head > 0:
            return self.proj[head - 1](state)
        return decoder.lm_head(state)


def extra_head_params(kind: str, num_heads: int, dim: int, vocab_size: int, ffn_dim: int = 0, kv_dim: int = 0) -> int:
    """Parameters that heads 2..K add to the decoder, by formula (the tests check it against the modules)."""
    d, V = dim, vocab_size
    per_head = {
        "linear": d * V,
        "latent": d * d,
        "medusa": d * d + d,
        # attention (q, o: d*d; k, v: d*kv_dim), SwiGLU (3*d*ffn), two layer norms and the head's final norm
        "layer": 2 * d * d + 2 * d * kv_dim + 3 * d * ffn_dim + 3 * d,
    }[kind]
    return (num_heads - 1) * per_head
