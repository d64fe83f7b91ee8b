"""Batches for training and decoding: Lhotse cut batches with features and tokens, and token batches of text.

Bad cuts cost one utterance, not a run: a cut whose features cannot be loaded, whose transcript is empty or holds
text outside the tokenizer, or that does not fit the model, is dropped from its batch with a warning naming it, and
counted in the batch (`num_skipped`).
"""
import logging
import random
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from lhotse import CutSet
from lhotse.cut import Cut
from lhotse.dataset import DynamicBucketingSampler, SimpleCutSampler

from mtp_asr.data.tokenizer import Tokenizer

logger = logging.getLogger("mtp_asr")


def pad_features(feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (T_i, F) feature matrices to (B, T_max, F) with zeros; also return the lengths."""
    lens = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
    out = torch.zeros(len(feats), int(lens.max()), feats[0].shape[1])
    for i, f in enumerate(feats):
        out[i, : f.shape[0]] = f
    return out, lens


def cut_text(cut: Cut) -> str:
    """A cut's transcript: its supervisions' texts, joined."""
    return " ".join(s.text or "" for s in cut.supervisions).strip()


def cut_frames(cut: Cut) -> int:
    """A cut's feature frames (10 ms shift), from its features or, before they exist, its duration."""
    return cut.num_frames or round(cut.duration * 100)


class AsrDataset(torch.utils.data.Dataset):
    """Maps a CutSet (one batch from a sampler) to features, lengths, token ids and texts.

    `fits(num_frames, num_tokens)`, when given, says whether an utterance fits the model (its prompt and transcript
    within the decoder's positions); those that do not are skipped rather than failing the whole batch.
    `ctc_tokenizer`, when the CTC head has its own vocabulary, adds its token ids as "ctc_tokens".
    """

    def __init__(self, tokenizer: Optional[Tokenizer] = None, fits: Optional[Callable[[int, int], bool]] = None,
                 ctc_tokenizer: Optional[Tokenizer] = None):
        self.tokenizer, self.fits, self.ctc_tokenizer = tokenizer, fits, ctc_tokenizer

    def __getitem__(self, cuts: CutSet) -> dict:
        feats, kept, tokens, ctc_tokens, skipped = [], [], [], [], 0
        for cut in cuts:
            text = cut_text(cut)
            ids = ctc_ids = None
            if self.tokenizer is not None:
                if not text:
                    logger.warning("skipping cut %s: empty transcript", cut.id)
                    skipped += 1
                    continue
                ids = _known_ids(self.tokenizer, text, cut.id, "")
                if self.ctc_tokenizer is not None:
                    ctc_ids = _known_ids(self.ctc_tokenizer, text, cut.id, "CTC ")
                if ids is None or (self.ctc_tokenizer is not None and ctc_ids is None):
                    skipped += 1
                    continue
            try:
                f = torch.from_numpy(cut.load_features()).float()
            except Exception as e:  # a corrupt or missing feature file must not stop a run
                # Lhotse appends the whole cut to the message; its first line says what went wrong.
                reason = (str(e).splitlines() or [""])[0]
                logger.warning("skipping cut %s: cannot load its features (%s: %s)", cut.id, type(e).__name__, reason)
                skipped += 1
                continue
            if f.shape[0] < 7 or not torch.isfinite(f).all():
                logger.warning("skipping cut %s: %d frames (needs >= 7) or non-finite features", cut.id, f.shape[0])
                skipped += 1
                continue
            if self.fits is not None and not self.fits(f.shape[0], len(ids or [])):
                logger.warning("skipping cut %s: %.1f s of audio and %d tokens do not fit the model's decoder "
                               "positions", cut.id, cut.duration, len(ids or []))
                skipped += 1
                continue
            feats.append(f)
            kept.append((cut, text))
            tokens.append(ids)
            ctc_tokens.append(ctc_ids)
        if not kept:
            return {"num_skipped": skipped, "cut_ids": []}
        x, lens = pad_features(feats)
        batch = {
            "feats": x,
            "feat_lens": lens,
            "cut_ids": [c.id for c, _ in kept],
            "texts": [t for _, t in kept],
            "durations": [c.duration for c, _ in kept],
            "num_skipped": skipped,
        }
        if self.tokenizer is not None:
            batch["tokens"] = tokens
            if self.ctc_tokenizer is not None:
                batch["ctc_tokens"] = ctc_tokens
        return batch


def _known_ids(tokenizer: Tokenizer, text: str, cut_id: str, what: str) -> Optional[list]:
    """The token ids of a transcript, or None (with a warning) when it holds text outside the tokenizer's vocabulary:
    training on <unk> would teach the model to emit it, so the cut's label is unusable as it is."""
    ids = tokenizer.encode(text)
    if tokenizer.unk_id not in ids:
        return ids
    pieces = tokenizer.sp.encode(text, out_type=str)
    unknown = " ".join(p for p, i in zip(pieces, ids) if i == tokenizer.unk_id)
    logger.warning("skipping cut %s: its transcript holds text outside the %stokenizer's vocabulary (%s)",
                   cut_id, what, unknown)
    return None


def read_cuts(path, lazy: bool = False) -> CutSet:
    """A cut manifest (JSON lines, optionally gzipped), read through once so that a file that is not one (not JSON,
    a truncated gzip, another kind of manifest) fails here with its name and line, not mid-run with a bare parser
    message. lazy=True returns a CutSet that streams from the file (large training sets)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cut manifest {path} does not exist")
    if not path.name.endswith((".jsonl", ".jsonl.gz")):
        raise ValueError(f"cut manifest {path}: expected JSON lines (.jsonl or .jsonl.gz)")
    eager, read = [], 0
    try:
        for cut in CutSet.from_jsonl_lazy(path):
            if not isinstance(cut, Cut):
                raise TypeError(f"it holds a {type(cut).__name__}, not a cut")
            read += 1
            if not lazy:
                eager.append(cut)
    except Exception as e:  # whatever the parser trips on, the file is at fault
        reason = (str(e).splitlines() or [""])[0]
        raise ValueError(f"{path}:{read + 1}: not a Lhotse cut manifest ({type(e).__name__}: {reason})") from None
    return CutSet.from_jsonl_lazy(path) if lazy else CutSet.from_cuts(eager)


def sample_cuts(manifests: Sequence, max_cuts: int, seed: int = 0) -> CutSet:
    """The cuts of `manifests`, or a random `max_cuts` of them: manifests are often sorted by speaker or corpus part,
    so their first cuts would not be representative."""
    cuts = CutSet.from_cuts(c for m in manifests for c in read_cuts(m))
    if len(cuts) > max_cuts:
        cuts = CutSet.from_cuts(random.Random(seed).sample(list(cuts), max_cuts))
    return cuts


class SkipFirst(torch.utils.data.Sampler):
    """Yields a sampler's batches after skipping the first `skip` (exact mid-epoch resume)."""

    def __init__(self, sampler, skip: int = 0):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            if next(it, None) is None:
                return
        # Not `yield from it`: that calls iter() again, and a Lhotse sampler's __iter__ restarts the epoch.
        while (batch := next(it, None)) is not None:
            yield batch


def cut_sampler(cuts: CutSet, max_duration: float, shuffle: bool, seed: int = 0, rank: int = 0,
                world_size: int = 1, num_buckets: int = 10):
    """Batches of at most `max_duration` seconds of audio: duration-bucketed (Lhotse DynamicBucketingSampler) when
    there are buckets to fill, else unbucketed (SimpleCutSampler); shuffled or in manifest order as `shuffle` says."""
    if num_buckets > 1:
        return DynamicBucketingSampler(cuts, max_duration=max_duration, shuffle=shuffle, num_buckets=num_buckets,
                                       seed=seed, rank=rank, world_size=world_size, drop_last=world_size > 1)
    return SimpleCutSampler(cuts, max_duration=max_duration, shuffle=shuffle, seed=seed, rank=rank,
                            world_size=world_size, drop_last=world_size > 1)


def cut_loader(cuts: CutSet, dataset: AsrDataset, max_duration: float, shuffle: bool, seed: int = 0,
               epoch: int = 0, skip: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
               num_buckets: int = 10) -> torch.utils.data.DataLoader:
    sampler = cut_sampler(cuts, max_duration, shuffle, seed, rank, world_size, num_buckets)
    sampler.set_epoch(epoch)
    # Its own generator: a DataLoader iterator otherwise draws a seed from the global RNG, and a resumed run, which
    # restores that RNG and then starts its iterator mid-epoch, would draw at a different point than the original.
    return torch.utils.data.DataLoader(dataset, sampler=SkipFirst(sampler, skip), batch_size=None,
                                       num_workers=num_workers, persistent_workers=False,
                                       generator=torch.Generator().manual_seed(seed + epoch))


class TextBatches:
    """Token batches for text-only training: at most `max_tokens` tokens per batch (padding included), sentences of
    similar length together, order reshuffled each epoch from the seed; rank r takes every world_size-th batch."""

    def __init__(self, sequences: Sequence[Sequence[int]], max_tokens: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if not sequences:
            raise ValueError("no text to train on")
        self.sequences, self.max_tokens, self.seed = sequences, max_tokens, seed
        self.rank, self.world_size = rank, world_size

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[list]:
        rng = random.Random(self.seed * 100003 + epoch)
        order = list(range(len(self.sequences)))
        rng.shuffle(order)
        batches = []
        pool = 64 * max(1, self.max_tokens // 32)  # sort within pools: similar lengths, still random order
        for start in range(0, len(order), pool):
            chunk = sorted(order[start: start + pool], key=lambda i: len(self.sequences[i]))
            batch, longest = [], 0
            for i in chunk:
                n = len(self.sequences[i]) + 2  # BOS and EOS
                if batch and max(longest, n) * (len(batch) + 1) > self.max_tokens:
                    batches.append(batch)
                    batch, longest = [], 0
                batch.append(i)
                longest = max(longest, n)
            if batch:
                batches.append(batch)
        rng.shuffle(batches)
        per_rank = len(batches) // self.world_size
        mine = batches[self.rank::self.world_size][:per_rank]
        for batch in mine[skip:]:
            yield [self.sequences[i] for i in batch]
