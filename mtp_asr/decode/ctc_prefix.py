"""CTC prefix scores for the decoder's beam search: joint CTC/attention decoding (Watanabe et al., 2017; ESPnet).

The decoder alone can drift from the audio: it writes fluent words the audio does not hold, or stops early. The
encoder's CTC head hears every frame. Joint decoding ranks each extension of a hypothesis g by

    (1 - weight) x log p_decoder(c | g) + weight x (log p_ctc(g + c ...) - log p_ctc(g ...)),

where p_ctc(h ...) is the CTC prefix probability: the probability, summed over alignments, that the label sequence
of the utterance starts with h; for EOS the probability that it is exactly g. Both terms telescope, so a hypothesis'
score is the weighted sum of its decoder and CTC log-probabilities, and the CTC term vetoes words the audio does not
hold wherever in the search they appear (N-best rescoring, `ctc-rescore`, can only choose among finished lists).

The prefix probability needs, per prefix, r_n[t] and r_b[t]: the probability of the first t + 1 frames being an
alignment of the prefix that ends in its last label and in blank. Extending g by c is two first-order linear
recurrences over the frames,

    r_n(h)[t] = (r_n(h)[t-1] + phi[t-1]) x_t(c),   r_b(h)[t] = (r_n(h)[t-1] + r_b(h)[t-1]) x_t(blank),

with phi = r_n(g) + r_b(g) (only r_b(g) when c repeats g's last label, which needs a blank between). A linear
recurrence y[t] = a[t] (y[t-1] + b[t-1]) has the closed form y[t] = A[t] (y[0] / A[0] + sum_{s<t} b[s] / A[s]) with
A the running product of a, so each is a cumulative sum and a cumulative log-sum-exp over the frames, in float64
(A spans thousands of nats), for every hypothesis and candidate at once: no Python loop over frames.
"""
from dataclasses import dataclass

import torch
from torch import Tensor

_FLOOR = -1e4  # log-probability of padding frames for every label but blank (and the floor of real ones)
# The floor of a prefix's log-probability: a prefix the frames cannot hold (more labels than frames allow) is
# improbable, not impossible, so that every utterance keeps hypotheses and scores stay finite (ESPnet does the same).
_LOG_ZERO = -1e10


@dataclass
class CTCPrefixState:
    """Per hypothesis: its utterance, r_n and r_b over the frames (log), its prefix log-probability, its last label
    (-1: the empty prefix)."""

    utt: Tensor  # (H,)
    r_n: Tensor  # (H, T)
    r_b: Tensor  # (H, T)
    prefix: Tensor  # (H,)
    last: Tensor  # (H,)

    def select(self, index: Tensor) -> "CTCPrefixState":
        return CTCPrefixState(self.utt[index], self.r_n[index], self.r_b[index], self.prefix[index], self.last[index])

    @staticmethod
    def cat(states: list) -> "CTCPrefixState":
        return CTCPrefixState(*(torch.cat([getattr(s, f) for s in states]) for f in ("utt", "r_n", "r_b", "prefix",
                                                                                        "last")))


class CTCPrefixScorer:
    """CTC prefix scores over a batch's (B, T, V+1) log-probabilities (`lens` valid frames per row), with CTC labels
    that are the decoder's token ids (blank last) and `eos` the decoder's end of sequence."""

    def __init__(self, log_probs: Tensor, lens: Tensor, blank: int, eos: int):
        x = log_probs.detach().double().clamp(min=_FLOOR)
        pad = torch.arange(x.shape[1], device=x.device)[None, :] >= lens.to(x.device)[:, None]
        x[pad] = _FLOOR
        x[..., blank][pad] = 0.0  # past the end only blanks, so r_b carries the end's probability forward
        self.x, self.lens, self.blank, self.eos = x, lens.to(x.device), blank, eos

    def initial(self) -> CTCPrefixState:
        """The empty prefix of every row: all blanks so far, prefix probability 1."""
        B, T = self.x.shape[:2]
        r_b = self.x[..., self.blank].cumsum(-1)
        zeros = torch.zeros(B, dtype=torch.float64, device=self.x.device)
        return CTCPrefixState(torch.arange(B, device=self.x.device), torch.full_like(r_b, float("-inf")), r_b,
                              zeros, torch.full((B,), -1, dtype=torch.long, device=self.x.device))

    def extend(self, state: CTCPrefixState, tokens: Tensor) -> tuple[Tensor, CTCPrefixState]:
        """The CTC log-probability each of `tokens` (H, C) adds to its hypothesis' prefix, (H, C) float64 (for EOS:
        the whole sequence's), and the extended prefixes' states, flattened to H x C rows (row i * C + j)."""
        H, C = tokens.shape
        T = self.x.shape[1]
        # Only the frames' scores of the candidates and blank, not the whole vocabulary's per hypothesis.
        x_c = self.x[state.utt[:, None], :, tokens]  # (H, C, T)
        x_b = self.x[state.utt, :, self.blank][:, None, :]  # (H, 1, T)
        both = torch.logaddexp(state.r_n, state.r_b)
        phi = torch.where((tokens == state.last[:, None])[..., None], state.r_b[:, None, :], both[:, None, :])
        empty = (state.last < 0)[:, None, None].expand(H, C, 1)
        log_a = x_c.cumsum(-1)
        start = torch.where(empty, 0.0, float("-inf")).double()  # r_n(h)[0] / A[0]: 1 only after nothing
        r_n = log_a + torch.cat([start, phi[..., :-1] - log_a[..., :-1]], -1).logcumsumexp(-1)
        log_b = torch.cat([torch.zeros_like(x_b[..., :1]), x_b[..., 1:].cumsum(-1)], -1)
        r_b = log_b + torch.cat([torch.full_like(r_n[..., :1], float("-inf")), r_n[..., :-1] - log_b[..., :-1]],
                                -1).logcumsumexp(-1)
        # The prefix probability: h's alignments may end at any frame, its last label there for the first time.
        prefix = torch.cat([r_n[..., :1], phi[..., :-1] + x_c[..., 1:]], -1).logsumexp(-1)
        whole = both.gather(1, (self.lens[state.utt] - 1)[:, None])  # (H, 1): g as the whole label sequence
        prefix = torch.where(tokens == self.eos, whole, prefix).clamp(min=_LOG_ZERO)
        added = prefix - state.prefix[:, None]
        flat = CTCPrefixState(state.utt.repeat_interleave(C), r_n.reshape(H * C, T), r_b.reshape(H * C, T),
                              prefix.reshape(-1), tokens.reshape(-1))
        return added, flat
