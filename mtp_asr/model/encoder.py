"""Speech encoder: convolutional subsampling (x2 or x4 in time) + Conformer blocks, with an optional CTC head."""
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchaudio.models import Conformer


@dataclass
class EncoderConfig:
    feat_dim: int = 80
    dim: int = 144
    num_layers: int = 4
    num_heads: int = 4
    ffn_dim: int = 576
    conv_kernel: int = 15
    subsampling_channels: int = 64
    # Feature frames (10 ms) per encoder frame: x4 (40 ms) or x2. Characters at up to 20 per second leave CTC barely
    # a blank between them at 40 ms: x2 learns more per step, x4 more per second of CPU (egs/synth/asr/RESULTS.md).
    subsampling: int = 4
    dropout: float = 0.1
    ctc: bool = True  # a CTC head on the encoder output (auxiliary loss; drafts for ctc-verify)
    # 0: the CTC head predicts the decoder's tokens. N > 0: its own vocabulary of N pieces (`data.ctc_tokenizer`, e.g.
    # characters under a pretrained LLM's 32k BPE): ctc-verify then re-tokenises the CTC text into decoder tokens.
    ctc_vocab_size: int = 0

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"encoder.dim ({self.dim}) must be divisible by encoder.num_heads ({self.num_heads})")
        if self.subsampling not in (2, 4):
            raise ValueError(f"encoder.subsampling must be 2 or 4 (got {self.subsampling})")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"encoder.conv_kernel must be odd (got {self.conv_kernel})")
        if self.ctc_vocab_size < 0:
            raise ValueError(f"encoder.ctc_vocab_size must be >= 0 (got {self.ctc_vocab_size})")


# Feature frames the two 3x3 subsampling convolutions need to give one encoder frame.
MIN_FRAMES = 7


def subsampled_lengths(lengths, factor: int = 4):
    """Frames after two 3x3 convolutions without padding, strides 2 and 2 (x4) or 2 and 1 (x2) in time."""
    return ((lengths - 1) // 2 - 1) // 2 if factor == 4 else (lengths - 1) // 2 - 2


def normalize_utterances(feats: Tensor, lens: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-utterance mean and variance normalisation of each feature bin over the valid frames (CMVN): log-mel
    values arrive around -7 +- 6, and speakers and channels shift them; padding stays zero."""
    valid = (torch.arange(feats.shape[1], device=feats.device) < lens[:, None]).unsqueeze(-1).to(feats.dtype)
    n = valid.sum(1, keepdim=True).clamp(min=1)
    mean = (feats * valid).sum(1, keepdim=True) / n
    var = ((feats - mean) ** 2 * valid).sum(1, keepdim=True) / n
    return (feats - mean) * torch.rsqrt(var + eps) * valid


class Conv2dSubsampling(nn.Module):
    def __init__(self, feat_dim: int, channels: int, dim: int, factor: int = 4):
        super().__init__()
        self.factor = factor
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=(factor // 2, 2)), nn.ReLU(),
        )
        freq = ((feat_dim - 1) // 2 - 1) // 2
        self.out = nn.Linear(channels * freq, dim)

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x = self.conv(x.unsqueeze(1))  # (B, C, T', F')
        B, C, T, F = x.shape
        return self.out(x.transpose(1, 2).reshape(B, T, C * F)), subsampled_lengths(lengths, self.factor)


class SpeechEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.subsampling = Conv2dSubsampling(cfg.feat_dim, cfg.subsampling_channels, cfg.dim, cfg.subsampling)
        self.conformer = Conformer(
            input_dim=cfg.dim, num_heads=cfg.num_heads, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
            depthwise_conv_kernel_size=cfg.conv_kernel, dropout=cfg.dropout,
        )
        # CTC over its vocabulary (the decoder's unless it has its own) plus a blank, which takes the last index.
        ctc_vocab = cfg.ctc_vocab_size or vocab_size
        self.ctc_head = nn.Linear(cfg.dim, ctc_vocab + 1) if cfg.ctc else None
        self.blank_id = ctc_vocab
        # torchaudio's depthwise convolutions would mix padding frames into the last valid frames, so a batched
        # utterance would encode differently from the same utterance alone: zero the padding right before them.
        self._valid = None
        for layer in self.conformer.conformer_layers:
            layer.conv_module.sequential[2].register_forward_pre_hook(self._mask_padding)

    def _mask_padding(self, module, args):
        return (args[0] * self._valid,) if self._valid is not None else None

    def forward(self, feats: Tensor, feat_lens: Tensor) -> tuple[Tensor, Tensor]:
        """feats (B, T, F) -> encoder frames (B, T/subsampling, dim) and their lengths."""
        if feats.shape[1] < MIN_FRAMES:
            raise ValueError(f"input of {feats.shape[1]} frames is too short for the subsampling "
                             f"(needs >= {MIN_FRAMES})")
        x, lens = self.subsampling(normalize_utterances(feats, feat_lens), feat_lens)
        lens = lens.clamp(min=1, max=x.shape[1])
        self._valid = (torch.arange(x.shape[1], device=x.device) < lens[:, None]).unsqueeze(1).to(x.dtype)
        try:
            return self.conformer(x, lens)
        finally:
            self._valid = None

    def ctc_log_probs(self, frames: Tensor) -> Tensor:
        return torch.log_softmax(self.ctc_head(frames).float(), dim=-1)
