"""The kinds of training the loop runs: speech (Speech-LLaMA on Lhotse cuts) and text (the decoder LM alone)."""
import functools
import logging
from pathlib import Path
from typing import Sequence

import torch
from lhotse import CutSet

from mtp_asr.config import to_dict
from mtp_asr.data.augment import spec_augment
from mtp_asr.data.dataset import AsrDataset, TextBatches, cut_loader, cut_sampler, read_cuts
from mtp_asr.data.tokenizer import Tokenizer, manifest_texts, text_file_lines
from mtp_asr.model.build import lm_config_dict, tokenizer_tensor
from mtp_asr.model.lm import MTPLanguageModel
from mtp_asr.model.speech_llama import SpeechLlama, fits_decoder
from mtp_asr.train.config import LMTrainConfig, SpeechTrainConfig
from mtp_asr.train.trainer import Task

logger = logging.getLogger("mtp_asr")


def load_cuts(paths: Sequence[str], what: str) -> CutSet:
    if not paths:
        raise ValueError(f"no {what} manifests given")
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{what} manifest {p} does not exist")
    cuts = [read_cuts(p, lazy=True) for p in paths]
    out = cuts[0]
    for more in cuts[1:]:
        out = out + more  # lazy concatenation
    return out


def _duration_ok(cut, limit: float) -> bool:
    """A named function rather than a lambda, so that DataLoader workers can pickle the filtered CutSet."""
    return 0.1 <= cut.duration <= limit


class SpeechTask(Task):
    unit = "audio-s"

    def __init__(self, model: SpeechLlama, cfg: SpeechTrainConfig, tokenizer: Tokenizer, ctc_only: bool = False):
        super().__init__(model)
        self.cfg, self.tokenizer, self.ctc_only = cfg, tokenizer, ctc_only
        limit = cfg.data.max_utt_duration
        train = load_cuts(cfg.data.train_cuts, "training")
        self.train_cuts = train.filter(functools.partial(_duration_ok, limit=limit))
        kept = sum(1 for _ in self.train_cuts)
        # Lhotse wants at least one cut per bucket.
        self.num_buckets = min(cfg.data.num_buckets, kept)
        self.valid_cuts = load_cuts(cfg.data.valid_cuts, "validation") if cfg.data.valid_cuts else None
        self.dataset = AsrDataset(tokenizer, fits=functools.partial(fits_decoder, cfg=model.cfg),
                                  ctc_tokenizer=model.ctc_tokenizer)

    def _sampler_args(self, rank, world_size) -> dict:
        return dict(max_duration=self.cfg.data.max_duration, shuffle=True, seed=self.cfg.seed, rank=rank,
                    world_size=world_size, num_buckets=self.num_buckets)

    def train_batches(self, epoch, skip, rank, world_size):
        return cut_loader(self.train_cuts, self.dataset, epoch=epoch, skip=skip, num_workers=self.cfg.num_workers,
                          **self._sampler_args(rank, world_size))

    def num_train_batches(self, rank, world_size) -> int:
        return sum(1 for _ in cut_sampler(self.train_cuts, **self._sampler_args(rank, world_size)))

    def valid_batches(self):
        if self.valid_cuts is None:
            return []
        return cut_loader(self.valid_cuts, self.dataset, self.cfg.data.max_duration, shuffle=False, num_buckets=1,
                          num_workers=self.cfg.num_workers)

    def is_empty(self, batch) -> bool:
        return not batch["cut_ids"]

    def augment(self, feats, lens):
        return spec_augment(feats, lens, self.cfg.spec_augment)

    def loss(self, model, batch):
        device = next(self.model.parameters()).device
        feats, lens = batch["feats"].to(device), batch["feat_lens"].to(device)
        if model.training:
            feats = self.augment(feats, lens)
        return model(feats, lens, batch["tokens"], ctc_weight=self.cfg.ctc_weight, ctc_only=self.ctc_only,
                     ctc_tokens=batch.get("ctc_tokens"))

    def batch_weight(self, batch) -> float:
        return float(sum(batch["durations"]))

    def checkpoint_info(self) -> dict:
        info = {"kind": "speech_llama", "model_config": to_dict(self.model.cfg),
                "tokenizer": tokenizer_tensor(self.tokenizer)}
        if self.model.ctc_tokenizer is not None:
            info["ctc_tokenizer"] = tokenizer_tensor(self.model.ctc_tokenizer)
        return info


def read_sentences(paths: Sequence[str], tokenizer: Tokenizer, what: str, max_tokens: int) -> list:
    """Token ids of every non-empty sentence of `paths`; those longer than `max_tokens` (the decoder's positions
    less [BOS]) are left out with a warning."""
    if not paths:
        raise ValueError(f"no {what} text files given")
    out = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{what} text file {p} does not exist")
        # A cut manifest contributes its transcripts; any other file holds one sentence per line.
        lines = manifest_texts([p]) if str(p).endswith((".jsonl", ".jsonl.gz")) else text_file_lines(p)
        ids = [x for x in tokenizer.encode_batch(list(lines)) if x]
        long = [len(x) for x in ids if len(x) > max_tokens]
        if long:
            logger.warning("%s text file %s: skipping %d of %d sentences longer than %d tokens (the decoder's "
                           "max_seq_len less [BOS]; the longest has %d)", what, p, len(long), len(ids), max_tokens,
                           max(long))
        out += [x for x in ids if len(x) <= max_tokens]
    if not out:
        raise ValueError(f"the {what} text files {list(paths)} hold no sentences")
    return out


class TextTask(Task):
    unit = "tokens"

    def __init__(self, model: MTPLanguageModel, cfg: LMTrainConfig, tokenizer: Tokenizer):
        super().__init__(model)
        self.cfg, self.tokenizer = cfg, tokenizer
        limit = cfg.decoder.max_seq_len - 1
        self.train = read_sentences(cfg.data.train_text, tokenizer, "training", limit)
        self.valid = read_sentences(cfg.data.valid_text, tokenizer, "validation", limit) if cfg.data.valid_text else []
        logger.info("text: %d training sentences (%d tokens), %d validation sentences", len(self.train),
                    sum(map(len, self.train)), len(self.valid))

    def _batches(self, sequences, rank=0, world_size=1) -> TextBatches:
        return TextBatches(sequences, self.cfg.data.max_tokens, self.cfg.seed, rank, world_size)

    def train_batches(self, epoch, skip, rank, world_size):
        return self._batches(self.train, rank, world_size).epoch(epoch, skip)

    def num_train_batches(self, rank, world_size) -> int:
        return sum(1 for _ in self._batches(self.train, rank, world_size).epoch(0))

    def valid_batches(self):
        return self._batches(self.valid).epoch(0) if self.valid else []

    def loss(self, model, batch):
        return model(batch)

    def batch_weight(self, batch) -> float:
        return float(sum(len(s) + 1 for s in batch))

    def checkpoint_info(self) -> dict:
        return {"kind": "lm", "lm_config": lm_config_dict(self.model), "tokenizer": tokenizer_tensor(self.tokenizer)}
