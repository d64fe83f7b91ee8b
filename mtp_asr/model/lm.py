"""The decoder language model with its multi-token-prediction heads: the part of Speech-LLaMA that can be
pre-trained on text alone and that every decoding method calls.

Sequences are a prefix of embeddings (`[BOS]` for text, `[BOS] audio [SEP]` for speech) followed by the transcript
`y_1 .. y_U`; the last prefix position predicts y_1 with head 1, y_2 with head 2, ... In general head k at the
position whose head-1 target is t_j predicts t_{j+k-1}, where t = y_1 .. y_U EOS; targets past EOS are ignored.
"""
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtp_asr.model.heads import HeadsConfig, MTPHeads
from mtp_asr.model.llama import KVCache, LlamaConfig, LlamaDecoder, rotary_positions

IGNORE = -100


@dataclass
class LossOutput:
    """The loss to back-propagate, plus sums and counts for logging (they add up across batches and ranks)."""

    loss: Tensor
    head_loss_sum: Tensor  # (K,) summed cross-entropy per head
    head_correct: Tensor  # (K,) argmax hits per head
    head_count: Tensor  # (K,) labelled positions per head
    num_utts: int
    ctc_loss_sum: Optional[Tensor] = None  # summed over utterances, when a CTC loss was computed
    nbest_scores: Optional[list] = None  # per utterance, (N,) log-scores of given hypotheses (MWER), with gradient
    metrics: dict = field(default_factory=dict)  # more figures to log: name -> (numerator, denominator) sums


def mtp_labels(labels: Tensor, num_heads: int) -> list:
    """Per-head labels from head 1's: head k at position i gets head 1's label at i+k-1, where position i has a
    label itself (positions before the transcript stay ignored) and the shifted one exists (else ignored)."""
    out = [labels]
    for k in range(1, num_heads):
        shifted = torch.full_like(labels, IGNORE)
        shifted[:, :-k] = labels[:, k:]
        shifted[labels == IGNORE] = IGNORE
        out.append(shifted)
    return out


class MTPLanguageModel(nn.Module):
    def __init__(self, decoder: LlamaConfig, heads: HeadsConfig, bos_id: int = 1, eos_id: int = 2,
                 prefix_rate: float = 0.0):
        super().__init__()
        self.bos_id, self.eos_id = bos_id, eos_id
        self.prefix_rate = prefix_rate  # rotary positions of the prefix: see `mtp_asr.model.llama.rotary_positions`
        self.decoder = LlamaDecoder(decoder)
        self.heads = MTPHeads(heads, self.decoder)
        self.head_weights = heads.weights

    @property
    def num_heads(self) -> int:
        return self.heads.num_heads

    def embed(self, tokens: Tensor) -> Tensor:
        return self.decoder.embed_tokens(tokens)

    def positions(self, prefix_lens: Tensor, num_slots: int) -> Tensor:
        """Rotary positions (B, num_slots) of sequences that start with prefixes of `prefix_lens` slots."""
        slots = torch.arange(num_slots, device=prefix_lens.device).expand(len(prefix_lens), -1)
        return rotary_positions(slots, prefix_lens, self.prefix_rate)

    def new_cache(self, batch: int, max_len: int, prefix_lens: Tensor, dtype=None) -> KVCache:
        """A KV cache for rows that start with prefixes of `prefix_lens` slots (and this model's MTP layers)."""
        return self.decoder.new_cache(batch, max_len, self.heads.num_cache_layers, dtype, prefix_lens,
                                      self.prefix_rate)

    def trunk(self, x: Tensor, prefix_lens: Tensor, labels: Optional[Tensor] = None) -> list:
        """All heads' states (see `MTPHeads.states`) of a causal pass without a cache over x (B, T, dim); `labels`,
        head 1's targets, are what `hydra` heads are conditioned on."""
        positions = self.positions(prefix_lens, x.shape[1])
        return self.heads.states(self.decoder, self.decoder(x, positions=positions), positions=positions,
                                 labels=labels)

    # ---- training losses --------------------------------------------------------------------------------------
    def append_tokens(self, prefix: Tensor, prefix_lens: Tensor, tokens: Sequence[Sequence[int]]
                      ) -> tuple[Tensor, Tensor]:
        """Put each row's transcript embeddings right after its prefix; return the inputs (B, T, dim) and head 1's
        labels (B, T): the last prefix position predicts y_1, ..., y_U's position predicts EOS."""
        B, P, D = prefix.shape
        device = prefix.device
        lens = torch.tensor([len(t) for t in tokens], device=device)
        T = int((prefix_lens + lens).max())
        x = torch.cat([prefix, prefix.new_zeros(B, max(T - P, 0), D)], dim=1)[:, :T].clone()
        labels = torch.full((B, T), IGNORE, dtype=torch.long, device=device)
        Umax = int(lens.max()) if B else 0
        tok = torch.full((B, Umax + 1), self.eos_id, dtype=torch.long, device=device)
        for b, t in enumerate(tokens):
            tok[b, : len(t)] = torch.as_tensor(list(t), dtype=torch.long)
        j = torch.arange(Umax + 1, device=device)
        has_input = j[None, :] < lens[:, None]  # y_1..y_U are inputs; EOS is only a target
        rows = torch.arange(B, device=device)[:, None].expand(-1, Umax + 1)
        pos = prefix_lens[:, None] + j[None, :]
        x[rows[has_input], pos[has_input]] = self.embed(tok[has_input]).to(x.dtype)
        has_label = j[None, :] <= lens[:, None]
        labels[rows[has_label], (pos - 1)[has_label]] = tok[has_label]
        return x, labels

    def mtp_loss(self, x: Tensor, prefix_lens: Tensor, labels: Tensor, weights: Optional[Sequence[float]] = None
                 ) -> LossOutput:
        """Weighted sum of the heads' mean cross-entropies on inputs x (prefixes of `prefix_lens` slots, then the
        transcripts) with head-1 labels; plus per-head sums."""
        weights = weights or self.head_weights
        states = self.trunk(x, prefix_lens, labels)
        K = self.num_heads
        loss = x.new_zeros((), dtype=torch.float32)
        loss_sum, correct, count = (torch.zeros(K, device=x.device) for _ in range(3))
        for k, lab in enumerate(mtp_labels(labels, K)):
            sel = lab != IGNORE
            n = int(sel.sum())
            if n == 0:
                continue
            logits = self.heads.logits(self.decoder, k, states[k][sel]).float()
            ce = F.cross_entropy(logits, lab[sel], reduction="sum")
            loss = loss + weights[k] * ce / n
            loss_sum[k] = ce.detach()
            correct[k] = (logits.argmax(-1) == lab[sel]).sum()
            count[k] = n
        return LossOutput(loss, loss_sum, correct, count, x.shape[0])

    def score_sequences(self, prefix: Tensor, prefix_lens: Tensor, tokens: Sequence[Sequence[int]],
                        heads: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]) -> list:
        """Log-probabilities, with gradient, of given token sequences under a given MTP factorisation: scored token i
        of row r is `tokens[r][i]` (or EOS past the transcript) predicted by head `heads[r][i]` (1..K) from the state
        after the first `positions[r][i]` transcript tokens. Returns one (n_scored,) tensor per row, the way a beam
        search scored its hypotheses (see mtp_asr.decode.beam), so that MWER can train that very score."""
        x, labels = self.append_tokens(prefix, prefix_lens, tokens)
        states = self.trunk(x, prefix_lens, labels)
        rows, cols, head_idx, targets = [], [], [], []
        for r, (toks, hs, js) in enumerate(zip(tokens, heads, positions)):
            for i, (h, j) in enumerate(zip(hs, js)):
                rows.append(r)
                cols.append(int(prefix_lens[r]) - 1 + j)
                head_idx.append(h - 1)
                targets.append(toks[i] if i < len(toks) else self.eos_id)
        device = x.device
        rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
        head_t, target_t = torch.tensor(head_idx, device=device), torch.tensor(targets, device=device)
        dtype = torch.promote_types(x.dtype, torch.float32)  # at least float32 for the log-softmax
        logp = torch.empty(len(rows), device=device, dtype=dtype)
        for k in range(self.num_heads):
            sel = (head_t == k).nonzero(as_tuple=True)[0]
            if sel.numel():
                logits = self.heads.logits(self.decoder, k, states[k][rows_t[sel], cols_t[sel]]).to(dtype)
                logp = logp.index_put((sel,), logits.log_softmax(-1).gather(-1, target_t[sel, None])[:, 0])
        counts = [len(hs) for hs in heads]
        return list(logp.split(counts))

    def forward(self, tokens: Sequence[Sequence[int]], head_weights: Optional[Sequence[float]] = None
                ) -> LossOutput:
        """Text-only loss (decoder pre-training): `[BOS] y_1 .. y_U [EOS]`, every head on every token."""
        B = len(tokens)
        device = self.decoder.embed_tokens.weight.device
        bos = self.decoder.embed_tokens(torch.full((B, 1), self.bos_id, device=device))
        prefix_lens = torch.ones(B, dtype=torch.long, device=device)
        x, labels = self.append_tokens(bos, prefix_lens, tokens)
        return self.mtp_loss(x, prefix_lens, labels, head_weights)
