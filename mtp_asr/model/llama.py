"""A LLaMA-architecture decoder (RMSNorm, rotary positions, SwiGLU, grouped-query attention) with a preallocated KV
cache that holds a different number of tokens in each row of a batch.

Parameter names follow Hugging Face's `LlamaForCausalLM` (minus its `model.` prefix), so its checkpoints load by name.

Per-row cache lengths: row r of the cache holds `lengths[r]` valid positions. A call with T new embeddings writes them
at slots `lengths[r] .. lengths[r]+T-1` and query i of row r attends to keys `< lengths[r] + i + 1`. Rotary positions
are the slot numbers, or, for a cache made with a prefix rate, those of `rotary_positions`. (A draft tree changes the
last two for its nodes: one position after the parent, attending to the ancestors only; see `call_geometry` and
`mtp_asr.decode.tree`.) The call does not advance `lengths`: the decoding algorithm decides afterwards how many of
the T positions it keeps (`cache.lengths += accepted`); anything past the new length is stale, masked out, and
overwritten by the next call. Prefill is the same with lengths 0 and right-padded prompts.
"""
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LlamaConfig:
    vocab_size: int = 500
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: as many as query heads (no grouping)
    ffn_dim: Optional[int] = None  # None: LLaMA's rule, 8/3 * dim rounded up to a multiple of 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = 64 * ((8 * self.dim // 3 + 63) // 64)
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"decoder: dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) "
                f"and n_heads by n_kv_heads ({self.n_kv_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in at least float32, as LLaMA does, so bf16 activations do not lose the mean square.
        y = x.to(torch.promote_types(x.dtype, torch.float32))
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


class Rotary(nn.Module):
    """Rotary embeddings in the half-split layout of Hugging Face's LLaMA (rotate_half), looked up by position."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: (B, H, T, hd); positions: (B, T)."""
        cos = self.cos[positions].unsqueeze(1).to(x.dtype)
        sin = self.sin[positions].unsqueeze(1).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rotary_positions(slots: Tensor, prefix_lens: Tensor, prefix_rate: float) -> Tensor:
    """Rotary positions (B, T) of sequence slots (B, T) in rows that start with a prefix of prefix_lens[r] slots.

    prefix_rate 0: the slot numbers. prefix_rate > 0 (the speech prompt `[BOS] a_0 .. a_{A-1} [SEP] y_1 ..`, at
    least 2 slots of prefix): slot 0 ([BOS]) stays at 0, a_j goes to 1 + round(j * prefix_rate), and the last prefix
    slot ([SEP]) to 1, what follows counting on from it (y_u at 1 + u). With the rate set to transcript tokens per
    audio embedding, a token and the audio that holds it get nearby positions, whatever the length of the audio before
    it: attention to the audio then needs a small relative offset, not one that differs per utterance. (Measured on
    the demo: this layout trained better than [BOS], [SEP] and a_0 all at 0 with y_u at u; see its RESULTS.md.)
    """
    if prefix_rate <= 0:
        return slots
    last = (prefix_lens - 1)[:, None]
    audio = 1 + torch.floor((slots - 1) * prefix_rate + 0.5).long()
    positions = torch.where(slots >= last, slots - last + 1, audio)
    return torch.where(slots == 0, torch.zeros_like(positions), positions)


class Geometry(NamedTuple):
    """Where a call's T new positions go: cache slots (B, T), rotary positions (B, T), attention mask and key span."""

    slots: Optional[Tensor]
    positions: Tensor
    mask: Optional[Tensor]
    span: int


class KVCache:
    """Preallocated keys and values for `n_layers` attention layers, with a valid length per row. Rows that start
    with a prefix of `prefix_lens` slots get the rotary positions of `rotary_positions` with `prefix_rate`."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, prefix_lens: Optional[Tensor] = None,
                 prefix_rate: float = 0.0):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        if prefix_rate > 0 and prefix_lens is None:
            raise ValueError("a KV cache with a prefix rate needs the prefix lengths")
        self.prefix_rate = prefix_rate
        self.prefix_lens = None if prefix_lens is None else prefix_lens.to(device=device, dtype=torch.long)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def select(self, rows: Tensor) -> None:
        """Keep (and reorder, or duplicate) the given rows: drops finished rows, reorders beam hypotheses."""
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
        self.lengths = self.lengths.index_select(0, rows)
        if self.prefix_lens is not None:
            self.prefix_lens = self.prefix_lens.index_select(0, rows)

    def move(self, rows: Tensor, src: Tensor, dst: Tensor) -> None:
        """In every layer, copy the keys and values of cache rows `rows` (n,) at slots src (n, A) to slots dst (n, A):
        an accepted path of a draft tree goes where a chain would have put it."""
        r = rows[:, None]
        self.k[:, r, :, dst] = self.k[:, r, :, src]
        self.v[:, r, :, dst] = self.v[:, r, :, src]

    def call_geometry(self, num_new: int, offsets: Optional[Tensor] = None, visible: Optional[Tensor] = None
                      ) -> Geometry:
        """Slots and rotary positions (B, T), attention mask (B, 1, T, S) and key span S of a call adding `num_new`
        positions. By default they form a chain; a draft tree (see `mtp_asr.decode.tree`) gives each new position
        its rotary offset from the row's length (B, T) and the new positions it may see (B, T, T)."""
        if int(self.lengths.max()) + num_new > self.max_len:
            raise RuntimeError(f"KV cache overflow: {int(self.lengths.max())} + {num_new} > {self.max_len} positions")
        slots = self.lengths[:, None] + torch.arange(num_new, device=self.lengths.device)  # (B, T)
        span = int(slots.max()) + 1
        keys = torch.arange(span, device=self.lengths.device)
        if visible is None:
            mask = keys[None, None, :] <= slots[:, :, None]  # (B, T, S)
        else:
            rel = keys[None, :] - self.lengths[:, None]  # (B, S): a key's index in the new block
            seen = visible.gather(2, rel.clamp(0, num_new - 1)[:, None, :].expand(-1, num_new, -1))
            mask = (rel < 0)[:, None, :] | (seen & (rel < num_new)[:, None, :])
        virtual = slots if offsets is None else self.lengths[:, None] + offsets
        positions = virtual if self.prefix_lens is None else rotary_positions(virtual, self.prefix_lens,
                                                                             self.prefix_rate)
        return Geometry(slots, positions, mask[:, None], span)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, rotary: Rotary, geometry: Geometry, cache: Optional[KVCache] = None,
                layer: int = 0) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotary(q, geometry.positions), rotary(k, geometry.positions)
        if cache is not None:
            rows, slots, span = torch.arange(B, device=x.device)[:, None], geometry.slots, geometry.span
            # Advanced indexing puts (B, T) first: the slot for row b, new position i is [b, :, slots[b, i]].
            cache.k[layer][rows, :, slots] = k.transpose(1, 2).to(cache.k.dtype)
            cache.v[layer][rows, :, slots] = v.transpose(1, 2).to(cache.v.dtype)
            k, v = cache.k[layer][:, :, :span], cache.v[layer][:, :, :span]
        p = self.dropout if self.training else 0.0
        # Grouped-query attention inside the kernel: copying the key/value heads (repeat_interleave) costs a copy of the
        # cache span per layer and call (egs/synth/asr/RESULTS.md).
        gqa = self.n_kv_heads != self.n_heads
        if cache is None:
            # Right-padded training batches need no padding mask: causal queries never see the padding after them.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=geometry.mask, dropout_p=p,
                                               enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = FeedForward(cfg)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, rotary: Rotary, geometry: Geometry, cache: Optional[KVCache] = None,
                layer: int = 0) -> Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), rotary, geometry, cache, layer))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class LlamaDecoder(nn.Module):
    """The trunk: embeddings, layers, final norm and the un-embedding (`lm_head`, which is MTP head 1)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.apply(_init_weights)

    def forward(self, x: Tensor, cache: Optional[KVCache] = None, geometry: Optional[Geometry] = None,
                positions: Optional[Tensor] = None) -> Tensor:
        """Run the layers on embeddings x (B, T, dim); returns the last layer's output before the final norm.

        Without a cache: a causal pass over the T slots (training), at rotary `positions` (B, T; default 0..T-1).
        With a cache: T new positions per row after the cached ones; `geometry` (from `cache.call_geometry(T)`) may be
        passed in when it is shared with MTP layers.
        """
        if cache is None:
            geometry = causal_geometry(x, positions)
        else:
            geometry = geometry or cache.call_geometry(x.shape[1])
        for i, layer in enumerate(self.layers):
            x = layer(x, self.rotary, geometry, cache, i)
        return x

    def new_cache(self, batch: int, max_len: int, extra_layers: int = 0, dtype=None,
                  prefix_lens: Optional[Tensor] = None, prefix_rate: float = 0.0) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.cfg.n_layers + extra_layers, batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim,
                       dtype or p.dtype, p.device, prefix_lens, prefix_rate)


def causal_geometry(x: Tensor, positions: Optional[Tensor] = None) -> Geometry:
    """The geometry of a pass without a cache over x (B, T, ...): rotary `positions`, by default 0..T-1."""
    if positions is None:
        positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    return Geometry(None, positions, None, 0)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
