"""Minimum word error rate (MWER) fine-tuning with N-best lists from the prefix-based MTP beam search.

Per batch: `mtp-beam` gives N hypotheses per utterance without gradient (the model in eval mode, as it will decode);
the same forward pass that computes the cross-entropy on the references then re-scores those hypotheses, with
gradient, under the factorisation the search used (each token's log-probability under the head that proposed it, from
the state it was proposed from); the posteriors P_n are the scores renormalised over the N-best, and

    loss = sum_n P_n (E_n - mean(E)) + lambda * CE,

with E_n the word errors of hypothesis n against the reference (kaldialign). Subtracting the mean leaves the
expected-risk gradient unchanged and lowers its variance (Prabhavalkar et al. 2018). Because `mtp-beam` emits several
tokens per decoder call, the N-best lists cost a fraction of an ordinary beam search's calls, which is what makes
on-the-fly MWER affordable.
"""
import functools
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import kaldialign
import torch

from mtp_asr.config import ConfigError
from mtp_asr.decode.beam import beam_search
from mtp_asr.decode.verify_beam import verify_beam_search
from mtp_asr.decode.lattice import MWER_SOURCES, get_backend, mwer_paths
from mtp_asr.decode.runner import length_limits
from mtp_asr.model.lm import LossOutput
from mtp_asr.model.speech_llama import SpeechLlama, fits_decoder
from mtp_asr.text import normalize_text
from mtp_asr.train.config import SpeechTrainConfig
from mtp_asr.train.tasks import SpeechTask
from mtp_asr.utils import cpu_threads

logger = logging.getLogger("mtp_asr")


@dataclass
class MWERConfig(SpeechTrainConfig):
    # The N-best search: mtp-beam (the paper's; scores under the heads' factorisation) or mtp-beam-verify (head 1's
    # scores; its lists need no lattice, so mwer_source must be nbest).
    search: str = "mtp-beam"
    nbest: int = 4  # hypotheses per utterance
    beam_size: int = 4
    threshold: float = 0.9  # mtp-beam's tau
    num_heads: Optional[int] = None  # heads the search uses (default: all)
    length_norm: float = 0.5  # as in decoding
    ce_weight: float = 0.1  # lambda: the cross-entropy on the references keeps the model anchored
    # Per-head weights of that cross-entropy (length K; default: the model's own head weights). [1, 0, ..., 0] keeps
    # heads 2..K off the references, e.g. after self-distillation fitted them to the model's own output.
    ce_head_weights: Optional[list] = None
    mwer_source: str = "nbest"  # nbest: the search's N-best; lattice: paths sampled from its lattice
    lattice_backend: str = "auto"  # lattice operations: k2 when installed (auto), or builtin, or k2
    lattice_scale: float = 0.5  # paths are sampled in proportion to exp(scale x score) (k2's nbest_scale)

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.nbest <= self.beam_size:
            raise ConfigError(f"nbest must be in 1..beam_size (got nbest {self.nbest}, beam_size {self.beam_size})")
        if self.threshold < 0 or self.ce_weight < 0:
            raise ConfigError("threshold and ce_weight must be >= 0")
        if self.ce_head_weights is not None and (not self.ce_head_weights or min(self.ce_head_weights) < 0):
            raise ConfigError(f"ce_head_weights must be a non-empty list of weights >= 0 (got {self.ce_head_weights})")
        if self.search not in ("mtp-beam", "mtp-beam-verify"):
            raise ConfigError(f"search must be mtp-beam or mtp-beam-verify (got {self.search!r})")
        if self.search == "mtp-beam-verify" and self.mwer_source != "nbest":
            raise ConfigError("search mtp-beam-verify gives N-best lists only: mwer_source must be nbest")
        if self.mwer_source not in MWER_SOURCES:
            raise ConfigError(f"mwer_source must be one of {', '.join(MWER_SOURCES)} (got {self.mwer_source!r})")
        if self.lattice_backend not in ("auto", "builtin", "k2"):
            raise ConfigError(f"lattice_backend must be auto, builtin or k2 (got {self.lattice_backend!r})")


def word_errors(ref: str, hyp: str) -> int:
    ref_w, hyp_w = normalize_text(ref).split(), normalize_text(hyp).split()
    return kaldialign.edit_distance(ref_w, hyp_w)["total"]


def mwer_loss(scores: torch.Tensor, errors: torch.Tensor) -> torch.Tensor:
    """sum_n softmax(scores)_n * (errors_n - mean(errors)) for one utterance's N-best."""
    posteriors = torch.softmax(scores, dim=0)
    return (posteriors * (errors - errors.mean())).sum()


def _searchable(num_frames: int, num_tokens: int, model: SpeechLlama) -> bool:
    """Whether a training cut fits the decoder (as in `train`) and leaves the search room for a token."""
    return fits_decoder(num_frames, num_tokens, model.cfg) and model.max_new_tokens(num_frames) >= 1


class MWERTask(SpeechTask):
    """SpeechTask whose loss is MWER on on-the-fly N-best lists plus lambda x the usual cross-entropy."""

    def __init__(self, model, cfg: MWERConfig, tokenizer):
        super().__init__(model, cfg, tokenizer)
        self.dataset.fits = functools.partial(_searchable, model=model)
        self.backend = get_backend(cfg.lattice_backend) if cfg.mwer_source == "lattice" else None
        weights = cfg.ce_head_weights
        if weights is not None and len(weights) != model.num_heads:
            raise ConfigError(f"ce_head_weights has {len(weights)} values for a model with {model.num_heads} heads")

    def search(self, feats, lens, durations) -> tuple[list, list, list]:
        """Hypotheses to re-score per utterance (N-best, or paths sampled from the search's lattice), decoder calls
        per utterance, and the best hypotheses; with the model as it decodes (eval mode, no gradient)."""
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            with torch.no_grad():
                enc = self.model.encode(feats, lens)
                prefix, prefix_lens = self.model.prompt(enc.audio, enc.audio_lens)
                limits = length_limits(self.model, lens.tolist(), durations)
                with cpu_threads(1, feats.device):  # a decoder loop: see DecodeSettings.decoder_threads
                    if self.cfg.search == "mtp-beam-verify":
                        out = verify_beam_search(self.model.lm, prefix, prefix_lens, self.cfg.num_heads,
                                                 torch.tensor(limits), self.cfg.beam_size, self.cfg.nbest,
                                                 self.cfg.length_norm)
                    else:
                        out = beam_search(self.model.lm, prefix, prefix_lens, "mtp-beam", self.cfg.num_heads,
                                          self.cfg.threshold, torch.tensor(limits), self.cfg.beam_size,
                                          self.cfg.nbest, self.cfg.length_norm,
                                          lattice=self.cfg.mwer_source == "lattice")
        finally:
            for m, training in modes.items():
                m.train(training)
        calls = [h.decoder_calls for h in out.hyps]
        if self.cfg.mwer_source == "nbest":
            return out.nbest, calls, out.hyps
        # Paths sampled from everything the search explored (as k2.MWERLoss does); the seed comes from torch's RNG,
        # which checkpoints restore, so a resumed run samples the same paths. An utterance whose search finished no
        # hypothesis has no complete path and keeps its N-best list.
        seed = int(torch.randint(0, 2**31 - 1, ()))
        paths = mwer_paths(out.lattices, "lattice", self.cfg.nbest, self.backend, self.cfg.lattice_scale, seed)
        return [p if p else nb for p, nb in zip(paths, out.nbest)], calls, out.hyps

    def loss(self, model, batch):
        device = next(self.model.parameters()).device
        feats, lens = batch["feats"].to(device), batch["feat_lens"].to(device)
        if model.training:
            feats = self.augment(feats, lens)
        nbest, calls, best = self.search(feats, lens, batch["durations"])
        out = model(feats, lens, batch["tokens"], head_weights=self.cfg.ce_head_weights, ctc_weight=self.cfg.ctc_weight,
                    nbest=nbest, ctc_tokens=batch.get("ctc_tokens"))
        texts = [[self.tokenizer.decode(h.tokens) for h in hyps] for hyps in nbest]
        mwer_total = out.loss.new_zeros(())
        expected = mean_errs = oracle = ref_words = tokens = 0.0
        for ref, hyp_texts, scores in zip(batch["texts"], texts, out.nbest_scores):
            errors = torch.tensor([float(word_errors(ref, h)) for h in hyp_texts], device=scores.device)
            mwer_total = mwer_total + mwer_loss(scores.float(), errors)
            post = torch.softmax(scores.detach().float(), 0)
            expected += float((post * errors).sum())
            mean_errs += float(errors.mean())
            oracle += float(errors.min())
            ref_words += len(normalize_text(ref).split())
        tokens = sum(len(h.tokens) for h in best)
        n = len(nbest)
        ce = out.loss
        out.loss = mwer_total / n + self.cfg.ce_weight * ce
        out.metrics = {"mwer_loss": (float(mwer_total.detach()), n), "expected_wer": (100 * expected, ref_words),
                       "nbest_mean_wer": (100 * mean_errs, ref_words), "oracle_wer": (100 * oracle, ref_words),
                       "search_tokens_per_call": (tokens, sum(calls)), "ce_loss": (float(ce.detach()) * n, n)}
        return out
