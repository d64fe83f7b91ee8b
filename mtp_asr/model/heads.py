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
- `hydra`: sequentially dependent heads (Hydra, Ankner et al. 2024): head k also sees the token head k-1 chose, as
  A_k n + W_k SiLU(M_k [n; e]), n the final-normed trunk state, e the RMS-normalised embedding of that token; A_k
  starts as the identity and W_k at zero, so every head starts as the `latent` one. Why: in blockwise decoding head 2
  drafts token u+2 without knowing which token head 1 emits at u+1, and its drafts are rejected mostly where head 1
  hesitates; conditioned on that token it needs no guess. Training feeds the reference tokens (teacher forcing),
  decoding the chosen ones: head 1's at u+1, then each head's argmax (or a draft tree's node) for the next.

A forward pass gives per-head states (what goes into each head's un-embedding) and logits are computed separately,
so decoding can project only the positions it needs.
"""
import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtp_asr.model.llama import DecoderLayer, Geometry, KVCache, LlamaDecoder, RMSNorm, causal_geometry

HEAD_KINDS = ("linear", "latent", "medusa", "layer", "hydra")


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
        elif self.kind == "hydra":
            self.latent = nn.ParameterList(nn.Parameter(torch.eye(d)) for _ in range(extra))
            self.mix = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(extra))
            self.out = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(extra))
            for o in self.out:
                nn.init.zeros_(o.weight)
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
    def conditional(self) -> bool:
        """Whether head k's state depends on the token chosen before it (head k-1's), not on the trunk alone."""
        return self.kind == "hydra"

    @property
    def num_cache_layers(self) -> int:
        """KV-cache layers these heads need after the trunk's."""
        return self.num_heads - 1 if self.kind == "layer" else 0

    def states(self, decoder: LlamaDecoder, hidden: Tensor, cache: Optional[KVCache] = None,
               geometry: Optional[Geometry] = None, positions: Optional[Tensor] = None, lazy: bool = False,
               labels: Optional[Tensor] = None) -> list:
        """Per-head inputs to the un-embedding, [head 1, ..., head K], each (B, T, d), from the trunk output `hidden`
        (before the final norm). For `layer` heads with a cache, `geometry` must be the call's geometry; without
        one, `positions` are the rotary positions the trunk used (default 0..T-1). lazy: head 1's alone where the
        others are a function of it (every kind but `layer`), for `logits_at` to project only where needed.
        labels (B, T): head 1's targets (IGNORE where none), which `hydra` heads need when not lazy: head k at
        position u is given head 1's target at u+k-2, the token before its own target (teacher forcing)."""
        normed = decoder.norm(hidden)
        if self.kind != "layer":
            if lazy or self.num_heads == 1:
                return [normed]
            if self.conditional and labels is None:
                raise ValueError("hydra heads need the labels (the tokens their states are conditioned on)")
            return [normed] + [self.project(decoder, k, normed, _shifted(labels, k - 1) if self.conditional else None)
                               for k in range(1, self.num_heads)]
        out = [normed]
        if self.num_heads > 1:
            if cache is None:
                geometry = causal_geometry(hidden, positions)
            base = decoder.cfg.n_layers
            for j, (layer, norm) in enumerate(zip(self.layers, self.norms)):
                out.append(norm(layer(hidden, decoder.rotary, geometry, cache, base + j)))
        return out

    def project(self, decoder: LlamaDecoder, head: int, normed: Tensor, prev: Optional[Tensor] = None) -> Tensor:
        """State of head `head` (0-based, >= 1; not for `layer` heads) from the final-normed trunk state; `hydra`
        heads also from `prev`, the token ids (normed.shape[:-1]) chosen before their own."""
        if self.kind == "latent":
            return normed @ self.latent[head - 1].T
        if self.kind == "hydra":  # functional calls: at decoding's one row a module call costs more than its product
            e = F.embedding(prev, decoder.embed_tokens.weight).to(normed.dtype)
            e = F.rms_norm(e, (e.shape[-1],))
            mix = self.mix[head - 1]
            mixed = F.silu(F.linear(torch.cat([normed, e], -1), mix.weight, mix.bias))
            return normed @ self.latent[head - 1].T + F.linear(mixed, self.out[head - 1].weight)
        if self.kind == "medusa":
            return normed + F.silu(self.blocks[head - 1](normed))
        return normed  # linear: the head's own projection is in `logits`

    def logits_at(self, decoder: LlamaDecoder, states: list, index: tuple, heads: range,
                  chosen: Optional[Tensor] = None, constrain: Optional[Callable] = None,
                  folded: Optional[tuple] = None) -> Tensor:
        """Logits (N, len(heads), V) of heads `heads` (0-based) at positions `index` of `states` (lazy or not). The
        shared un-embedding runs once for all of them: at decoding's few rows one product of 3 rows costs less than 3
        of one (about 40-60 us less per call at batch 1 on the demo's CPU, within the noise of a whole decode).
        `hydra` heads 1.. (a range from 1) run one after another: head 2 given `chosen` (N,), the token emitted after
        position `index` (head 1's choice), each later head given the argmax of the one before.
        constrain: applied to each head's (N, V) logits in turn (e.g. a lexicon's mask, `mtp_asr.decode.generate`);
        the returned logits, and the tokens `hydra` heads are given, are the constrained ones. folded: `fold`'s
        tables for these weights (decoding computes them once per batch), or None."""
        first = states[0][index]
        if self.conditional and len(heads) and heads[0] > 0:
            if heads[0] != 1 or chosen is None:
                raise ValueError("hydra heads run in order from head 2 and need the token chosen before it")
            head_logits = self._conditional_heads(decoder, first, folded)
            out, prev = [], chosen
            for k in heads:
                logits = head_logits(k, prev)
                out.append(constrain(logits) if constrain else logits)
                prev = out[-1].argmax(-1)
            return torch.stack(out, -2)
        per_head = [first if k == 0 else states[k][index] if k < len(states) else self.project(decoder, k, first)
                    for k in heads]
        if self.kind == "linear":
            out = torch.stack([self.logits(decoder, k, s) for k, s in zip(heads, per_head)], -2)
        else:
            out = decoder.lm_head(torch.stack(per_head, -2))
        return torch.stack([constrain(out[..., j, :]) for j in range(len(heads))], -2) if constrain else out

    def tree_drafts(self, decoder: LlamaDecoder, states: list, index: tuple, chosen: Tensor, rank_paths,
                    folded: Optional[tuple] = None) -> list:
        """`hydra` heads' drafts along each rank path (`mtp_asr.decode.tree_spec`) at positions `index`: per row, one
        token list per path, its k-th token head k+1's candidate of that rank given the path's token before it (the
        first given `chosen`). Heads run depth by depth, each once for all the nodes of its depth. folded: as in
        `logits_at`."""
        first = states[0][index]
        n = first.shape[0]
        head_logits = self._conditional_heads(decoder, first, folded)
        node = {(): chosen}  # rank prefix -> (n,) tokens
        for depth, (level, parents, width) in enumerate(_tree_levels(tuple(rank_paths)), 1):
            prev = torch.cat([node[p] for p in parents]) if len(parents) > 1 else node[parents[0]]
            logits = head_logits(depth, prev)
            top = (logits.argmax(-1, keepdim=True) if width == 1 else logits.topk(width, dim=-1).indices)
            top = top.view(len(parents), n, width)
            for p, j in level:
                node[p] = top[j, :, p[-1]]
        del node[()]
        keys = list(node)
        flat = torch.stack([node[p] for p in keys], 1).tolist()  # (n, nodes): one transfer
        where = {p: i for i, p in enumerate(keys)}
        return [[[flat[r][where[p[:i + 1]]] for i in range(len(p))] for p in rank_paths] for r in range(n)]

    def _conditional_heads(self, decoder: LlamaDecoder, normed: Tensor, folded: Optional[tuple]):
        """`hydra` heads at the trunk states `normed` (N, d), for decoding: a function (head, prev) -> logits, prev the
        tokens chosen before that head's, (r * N,) for r candidates per state (row i * N + j: state j). With
        `fold`'s tables every head's trunk side comes from one product per call; without, each head is computed as
        `project` defines it."""
        if folded is None:
            def plain(head: int, prev: Tensor) -> Tensor:
                r = prev.shape[0] // normed.shape[0]
                rows = normed.repeat(r, 1) if r > 1 else normed
                return F.linear(self.project(decoder, head, rows, prev), decoder.lm_head.weight)
            return plain
        big, tokens, ups = folded
        d, V, n = normed.shape[-1], tokens[0].shape[0], len(tokens)
        z = normed @ big.T
        trunk, unembedded = z[:, : n * d].split(d, -1), z[:, n * d:].split(V, -1)

        def fast(head: int, prev: Tensor) -> Tensor:
            r = prev.shape[0] // normed.shape[0]
            p, u = trunk[head - 1], unembedded[head - 1]
            if r > 1:
                p, u = p.repeat(r, 1), u.repeat(r, 1)
            return torch.addmm(u, F.silu(p + tokens[head - 1][prev]), ups[head - 1])
        return fast

    @torch.no_grad()
    def fold(self, decoder: LlamaDecoder) -> Optional[tuple]:
        """`hydra` heads' weights folded for decoding, or None (other kinds; a vocabulary larger than the width).

        Head k's logits are n (H A_k)^T + SiLU(n M_k^n^T + e M_k^e^T + b_k) (H W_k)^T (n the trunk state, e the
        normed embedding of the token before, H the un-embedding; see `project`). Folded: the stacked trunk-side
        matrices [M_k^n..., H A_k...] (one product per call for every head), token tables T_k = E M_k^e^T + b_k
        (V, d), and U_k = (H W_k)^T (d, V); head k is then Z_k + SiLU(P_k + T_k[prev]) U_k. Measured on the demo's
        decoder (width 192, 30 tokens, K=4): a chain of drafts 145 -> 60 us per call at batch 1. Only for
        vocabularies no larger than the width (characters, small BPE sets): the tables hold 3(K-1) V x d matrices,
        as much as several un-embeddings of a large vocabulary. Decoding folds once per batch, so the tables always
        match the weights."""
        H, E = decoder.lm_head.weight, decoder.embed_tokens.weight
        V, d = H.shape
        if not self.conditional or self.num_heads == 1 or V > d:
            return None
        e = F.rms_norm(E, (d,))
        big = torch.cat([m.weight[:, :d] for m in self.mix] + [H @ a for a in self.latent])
        tokens = [e @ m.weight[:, d:].T + m.bias for m in self.mix]
        ups = [(H @ o.weight).T.contiguous() for o in self.out]
        return big, tokens, ups

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
        "hydra": d * d + (2 * d * d + d) + d * d,
        # attention (q, o: d*d; k, v: d*kv_dim), SwiGLU (3*d*ffn), two layer norms and the head's final norm
        "layer": 2 * d * d + 2 * d * kv_dim + 3 * d * ffn_dim + 3 * d,
    }[kind]
    return (num_heads - 1) * per_head


@functools.lru_cache(maxsize=64)
def _tree_levels(rank_paths: tuple) -> list:
    """Per depth of a tree of rank paths: its nodes (each with its parent's index in the parents), the distinct
    parents (rank prefixes one shorter), and the candidates needed per parent."""
    prefixes = sorted({p[:d] for p in rank_paths for d in range(1, len(p) + 1)})
    out = []
    for depth in range(1, max(map(len, prefixes), default=0) + 1):
        level = [p for p in prefixes if len(p) == depth]
        parents = sorted({p[:-1] for p in level})
        out.append(([(p, parents.index(p[:-1])) for p in level], parents, 1 + max(p[-1] for p in level)))
    return out


def _shifted(labels: Tensor, shift: int) -> Tensor:
    """labels[:, u + shift] at u (0 past the end and where there is no label: any valid id; no target reads it)."""
    out = torch.zeros_like(labels)
    out[:, : labels.shape[1] - shift] = labels[:, shift:]
    return out.clamp(min=0)
