"""80-dim log-mel fbank for prepared CutSets, stored with Lhotse's LilcomChunkyWriter.

The cuts are cut into contiguous chunks, each extracted by Lhotse's `compute_and_store_features` into its own
storage file in a worker process, so that finished chunks give progress lines with rate and ETA.
"""
import math
import multiprocessing
import re
import shutil
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from lhotse import CutSet, Fbank, FbankConfig, LilcomChunkyWriter, load_manifest, validate
from lhotse.utils import fastcopy

from mtp_asr.data import PreparationError
from mtp_asr.utils import Progress, atomic_dir, atomic_path, logger

NUM_MEL_BINS = 80
FRAME_SHIFT = 0.01
# Chunks of about this much audio (and at least 4 per job, so the workers stay balanced).
CHUNK_SECONDS = 1800.0


def fbank_extractor() -> Fbank:
    """Kaldi-compatible fbank: 25 ms Povey window, 10 ms shift, no dither, snip_edges=False (Lhotse defaults)."""
    return Fbank(FbankConfig(num_filters=NUM_MEL_BINS, frame_shift=FRAME_SHIFT, dither=0.0))


def find_splits(in_dir: Path, splits: Optional[Sequence[str]] = None) -> List[str]:
    """The requested splits (checked to exist) or every IN_DIR/cuts_<split>.jsonl.gz."""
    in_dir = Path(in_dir)
    if splits:
        missing = [s for s in splits if not (in_dir / f"cuts_{s}.jsonl.gz").is_file()]
        if missing:
            raise FileNotFoundError(
                f"no manifest for split(s) {', '.join(missing)} in {in_dir} (cuts_<split>.jsonl.gz)"
            )
        return list(splits)
    found = sorted(re.fullmatch(r"cuts_(.+)\.jsonl\.gz", p.name).group(1) for p in in_dir.glob("cuts_*.jsonl.gz"))
    if not found:
        raise FileNotFoundError(f"no cuts_<split>.jsonl.gz manifests in {in_dir}")
    return found


def extract_chunk(cuts: CutSet, storage_path: str) -> CutSet:
    # One torch thread: fbank's small matrices gain nothing from more, and with other processes on the cores
    # (our own jobs, or anyone's) the threads contend: measured 15x slower on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cuts.compute_and_store_features(
            extractor=fbank_extractor(),
            storage_path=storage_path,
            num_jobs=1,
            storage_type=LilcomChunkyWriter,
            progress_bar=False,
        )
    finally:
        torch.set_num_threads(threads)


def worker_pool(jobs: int) -> Optional[ProcessPoolExecutor]:
    """Processes for `jobs` > 1, spawned as Lhotse does: a fork of a process whose torch ran threads can hang."""
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) if jobs > 1 else None


def compute_fbank_split(
    in_manifest: Path, out_dir: Path, split: str, jobs: int = 1, pool: Optional[Executor] = None
) -> Path:
    """Features for one CutSet -> OUT_DIR/cuts_<split>.jsonl.gz, arrays under OUT_DIR/feats_<split>/.

    `pool` lets several splits share one set of worker processes (starting them costs seconds).
    """
    if pool is None and jobs > 1:
        with worker_pool(jobs) as own_pool:
            return compute_fbank_split(in_manifest, out_dir, split, jobs, own_pool)
    out_dir = Path(out_dir)
    out_manifest = out_dir / f"cuts_{split}.jsonl.gz"
    if out_manifest.resolve() == Path(in_manifest).resolve():
        raise ValueError(f"OUT_DIR must differ from IN_DIR: {out_manifest} would overwrite its own input")
    cuts = load_manifest(in_manifest).to_eager()
    if len(cuts) == 0:
        raise ValueError(f"{in_manifest} holds no cuts")
    # Features go into a new directory beside the old one, which (with its manifest) stays usable until the new
    # features are complete: a failed or interrupted recompute loses nothing. Leftovers of killed runs go first.
    storage = out_dir / f"feats_{split}"
    for stale in out_dir.glob(f".feats_{split}.tmp-*"):  # atomic_dir's leftovers from killed runs
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_dir(storage) as new_storage:
        out = _extract(cuts, new_storage, split, jobs, pool, in_manifest)
        out = CutSet.from_cuts(fastcopy(c, features=fastcopy(c.features, storage_path=str(
            storage / Path(c.features.storage_path).name))) for c in out)
        # Before the swap, the old manifest goes (it must never point at the new files); the new one follows it,
        # so a crash in between leaves no manifest, never a mismatched one.
        out_manifest.unlink(missing_ok=True)
    with atomic_path(out_manifest) as tmp:
        out.to_file(tmp)
    logger.info("fbank %s: %d cuts -> %s", split, len(out), out_manifest)
    return out_manifest


def _extract(cuts: CutSet, storage: Path, split: str, jobs: int, pool: Optional[Executor], in_manifest) -> CutSet:
    """Features of `cuts` written in chunks under `storage`, in parallel on `pool`; the validated cuts."""
    total = sum(c.duration for c in cuts)
    n_chunks = min(len(cuts), max(4 * jobs, math.ceil(total / CHUNK_SECONDS)))
    chunks = cuts.split(n_chunks)
    bar = Progress(f"fbank {split}", total=total, unit="audio-s")
    if pool is None:
        results = (extract_chunk(c, str(storage / f"feats-{i}")) for i, c in enumerate(chunks))
    else:
        futures = [pool.submit(extract_chunk, c, str(storage / f"feats-{i}")) for i, c in enumerate(chunks)]
        results = (f.result() for f in futures)
    done: List[CutSet] = []
    for chunk, result in zip(chunks, results):
        done.append(result)
        bar.update(sum(c.duration for c in chunk))
    out = CutSet.from_cuts(c for chunk in done for c in chunk)

    # Lhotse drops a cut whose audio fails to load instead of raising: name them.
    lost = sorted(set(cuts.ids) - set(out.ids))
    if lost:
        logger.warning(
            "fbank %s: %d cut(s) could not load audio and were dropped: %s", split, len(lost), ", ".join(lost[:20])
        )
        if len(out) == 0:
            raise PreparationError(f"fbank {split}: no cut in {in_manifest} could load its audio")
    validate(out)
    bar.close(f"{len(out)} cuts")
    return out


def compute_fbank(in_dir, out_dir, splits: Optional[Sequence[str]] = None, jobs: int = 1) -> Dict[str, Path]:
    """compute_fbank_split for every IN_DIR/cuts_<split>.jsonl.gz (or the listed splits); returns {split: path}."""
    in_dir = Path(in_dir)
    names = find_splits(in_dir, splits)
    pool = worker_pool(jobs)
    try:
        return {s: compute_fbank_split(in_dir / f"cuts_{s}.jsonl.gz", Path(out_dir), s, jobs, pool) for s in names}
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
