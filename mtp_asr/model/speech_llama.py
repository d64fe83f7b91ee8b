"""Speech-LLaMA: encoder -> adapter -> audio embeddings that prompt the decoder LM with K multi-token heads.

Prompt per utterance: `[BOS] a_1 .. a_A [SEP] y_1 .. y_U [EOS]`, where [SEP] is a learned embedding (so any tokenizer,
a pretrained LLM's included, works unchanged). The loss covers the transcript only (see `mtp_asr.model.lm`).
Rotary positions run through the whole sequence (the paper), or, with `audio_position_rate` > 0, put each transcript
token near the audio embeddings that hold it (see `mtp_asr.model.llama.rotary_positions`).
"""
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtp_asr.model.adapter import Adapter, AdapterConfig
from mtp_asr.model.encoder import EncoderConfig, SpeechEncoder, subsampled_lengths
from mtp_asr.model.heads import HeadsConfig
from mtp_asr.model.llama import LlamaConfig
from mtp_asr.model.lm import LossOutput, MTPLanguageModel


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    decoder: LlamaConfig = field(default_factory=LlamaConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    bos_id: int = 1
    eos_id: int = 2
    # Transcript tokens per audio embedding for aligned rotary positions (`mtp_asr.model.llama.rotary_positions`):
    # audio embedding j at position 1 + round(j * rate) and the transcript from 1 at [SEP], so that the decoder finds
    # the audio of a token at a small relative offset. 0: consecutive positions over the whole prompt (the paper).
    # `mtp-asr train` accepts "auto": the rate measured on the training cuts.
    audio_position_rate: float = 0.0

    def __post_init__(self):
        if self.audio_position_rate < 0:
            raise ValueError(f"audio_position_rate must be >= 0 (got {self.audio_position_rate})")


@dataclass
class Encoded:
    frames: Tensor  # encoder output (B, T, enc_dim)
    frame_lens: Tensor
    audio: Tensor  # audio embeddings (B, A, dim)
    audio_lens: Tensor


def prompt_positions(num_frames: int, cfg: ModelConfig) -> int:
    """Decoder positions taken by the prompt [BOS] audio [SEP] of an utterance with `num_frames` feature frames
    (the encoder's subsampling, then `adapter.stack` encoder frames per audio embedding)."""
    frames = max(1, subsampled_lengths(num_frames, cfg.encoder.subsampling))
    return -(-frames // cfg.adapter.stack) + 2


def fits_decoder(num_frames: int, num_tokens: int, cfg: ModelConfig) -> bool:
    """Whether an utterance's prompt, transcript and EOS fit in the decoder's positions (training)."""
    slots_fit = prompt_positions(num_frames, cfg) + num_tokens + 1 <= cfg.decoder.max_seq_len
    return slots_fit and _audio_fits(num_frames, cfg)


def _audio_fits(num_frames: int, cfg: ModelConfig) -> bool:
    """Whether the last audio embedding's rotary position (aligned positions) is within the decoder's."""
    if cfg.audio_position_rate <= 0:
        return True
    last = prompt_positions(num_frames, cfg) - 3  # j of the last audio embedding, at 1 + round(j * rate)
    return last * cfg.audio_position_rate + 0.5 < cfg.decoder.max_seq_len - 1


class SpeechLlama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = SpeechEncoder(cfg.encoder, cfg.decoder.vocab_size)
        self.adapter = Adapter(cfg.adapter, cfg.encoder.dim, cfg.decoder.dim)
        self.sep = nn.Parameter(torch.randn(cfg.decoder.dim) * 0.02)
        self.lm = MTPLanguageModel(cfg.decoder, cfg.heads, cfg.bos_id, cfg.eos_id, cfg.audio_position_rate)
        # The CTC head's own sentencepiece model when `encoder.ctc_vocab_size` > 0 (set by training and loading;
        # checkpoints carry it beside the decoder's).
        self.ctc_tokenizer = None

    @property
    def num_heads(self) -> int:
        return self.lm.num_heads

    def prompt_length(self, num_frames: int) -> int:
        """Decoder positions taken by the prompt of an utterance with `num_frames` feature frames."""
        return prompt_positions(num_frames, self.cfg)

    def max_new_tokens(self, num_frames: int) -> int:
        """Transcript tokens that still fit in the decoder's positions after the prompt (and K drafts)."""
        if not _audio_fits(num_frames, self.cfg):
            return 0
        return self.cfg.decoder.max_seq_len - self.prompt_length(num_frames) - 2 * self.num_heads - 2

    def encode(self, feats: Tensor, feat_lens: Tensor) -> Encoded:
        frames, frame_lens = self.encoder(feats, feat_lens)
        # Zero the padding so the adapter's last stack of a short utterance sees zeros, whatever its batch.
        valid = torch.arange(frames.shape[1], device=frames.device) < frame_lens[:, None]
        audio, audio_lens = self.adapter(frames * valid.unsqueeze(-1).to(frames.dtype), frame_lens)
        return Encoded(frames, frame_lens, audio, audio_lens)

    def prompt(self, audio: Tensor, audio_lens: Tensor) -> tuple[Tensor, Tensor]:
        """`[BOS] audio [SEP]` per row, left-aligned and right-padded: (B, A+2, dim) and the prompt lengths."""
        B, A, D = audio.shape
        rows = torch.arange(B, device=audio.device)
        bos = self.lm.embed(torch.tensor(self.cfg.bos_id, device=audio.device)).to(audio.dtype)
        emb = torch.cat([bos.expand(B, 1, D), audio, audio.new_zeros(B, 1, D)], dim=1)
        emb[rows, audio_lens + 1] = self.sep.to(audio.dtype)
        return emb, audio_lens + 2

    def forward(self, feats: Tensor, feat_lens: Tensor, tokens: Sequence[Sequence[int]],
                head_weights: Optional[Sequence[float]] = None, ctc_weight: float = 0.0,
                ctc_only: bool = False, nbest: Optional[Sequence[Sequence]] = None,
                ctc_tokens: Optional[Sequence[Sequence[int]]] = None) -> LossOutput:
        """Training loss. `ctc_only` trains the encoder alone with CTC (encoder pre-training; decoder untouched).
        `nbest` (per utterance, hypotheses with tokens/heads/positions as a beam search records them) adds their
        log-scores, with gradient, under the factorisation the search used (MWER training). `ctc_tokens`: the CTC
        targets when the CTC head has its own vocabulary (default: `tokens`)."""
        if self.cfg.encoder.ctc_vocab_size and ctc_tokens is None and (ctc_only or ctc_weight > 0):
            raise ValueError("this model's CTC head has its own vocabulary: the CTC loss needs ctc_tokens")
        ctc_tokens = tokens if ctc_tokens is None else ctc_tokens
        if ctc_only:
            if self.encoder.ctc_head is None:
                raise ValueError("CTC-only training needs a model with encoder.ctc: true")
            frames, frame_lens = self.encoder(feats, feat_lens)
            ctc = self.ctc_loss(frames, frame_lens, ctc_tokens)
            zeros = torch.zeros(self.num_heads, device=feats.device)
            return LossOutput(ctc / _num_tokens(ctc_tokens), zeros, zeros, zeros, len(tokens), ctc.detach())
        enc = self.encode(feats, feat_lens)
        prefix, prefix_lens = self.prompt(enc.audio, enc.audio_lens)
        x, labels = self.lm.append_tokens(prefix, prefix_lens, tokens)
        out = self.lm.mtp_loss(x, prefix_lens, labels, head_weights)
        if ctc_weight > 0:
            if self.encoder.ctc_head is None:
                raise ValueError("a CTC weight > 0 needs a model with encoder.ctc: true")
            ctc = self.ctc_loss(enc.frames, enc.frame_lens, ctc_tokens)
            out.loss = out.loss + ctc_weight * ctc / _num_tokens(ctc_tokens)  # per CTC target, like the CE per token
            out.ctc_loss_sum = ctc.detach()
        if nbest is not None:
            owner = [b for b, hyps in enumerate(nbest) for _ in hyps]
            flat = [h for hyps in nbest for h in hyps]
            idx = torch.tensor(owner, device=prefix.device)
            per_token = self.lm.score_sequences(prefix[idx], prefix_lens[idx], [h.tokens for h in flat],
                                                [h.heads for h in flat], [h.positions for h in flat])
            totals = torch.stack([t.sum() for t in per_token])
            out.nbest_scores = list(totals.split([len(hyps) for hyps in nbest]))
        return out

    def ctc_loss(self, frames: Tensor, frame_lens: Tensor, tokens: Sequence[Sequence[int]]) -> Tensor:
        log_probs = self.encoder.ctc_log_probs(frames)
        targets = torch.tensor([t for seq in tokens for t in seq], dtype=torch.long)
        target_lens = torch.tensor([len(seq) for seq in tokens], dtype=torch.long)
        return F.ctc_loss(log_probs.transpose(0, 1), targets, frame_lens.cpu(), target_lens,
                          blank=self.encoder.blank_id, reduction="sum", zero_infinity=True)


def _num_tokens(tokens: Sequence[Sequence[int]]) -> int:
    return max(1, sum(len(t) for t in tokens))
