"""Checkpoints: written atomically, read with `weights_only=True`, found for resume, averaged.

A checkpoint is a plain dict of tensors and Python primitives (no pickled objects), so loading one never runs code:
`model` (state dict), `model_config` / `train_config` (dicts), `tokenizer` (the sentencepiece model as a uint8
tensor, so a checkpoint decodes on its own), `kind` ("speech_llama" or "lm"), and for resume `optimizer`,
`scheduler`, `rng`, `epoch`, `step`, `batch_in_epoch`.
"""
import glob
import logging
import pickle
import re
from pathlib import Path
from typing import Optional

import torch

from mtp_asr.utils import atomic_path

logger = logging.getLogger("mtp_asr")


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(path, state: dict) -> None:
    """Write `state` to `path` through a temporary file and a rename: a crash leaves the old file or the new one."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """Load with `weights_only=True`; `mmap=True` reads tensors lazily (cheap when only metadata is needed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled Python objects, which could run code when loaded "
            f"(only tensors and plain values are accepted). Details: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated: {e}") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    # Generator states must be CPU byte tensors; a checkpoint loaded with map_location="cuda" holds them on the GPU.
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _step_of(path: Path) -> int:
    m = re.fullmatch(r"checkpoint-(\d+)\.pt", path.name)
    return int(m.group(1)) if m else -1


def checkpoint_files(exp_dir) -> list:
    """`checkpoint-<step>.pt` files, oldest first."""
    files = [Path(p) for p in glob.glob(str(Path(glob.escape(str(exp_dir))) / "checkpoint-*.pt"))]
    return sorted((p for p in files if _step_of(p) >= 0), key=_step_of)


def epoch_files(exp_dir) -> dict:
    out = {}
    for p in Path(exp_dir).glob("epoch-*.pt"):
        m = re.fullmatch(r"epoch-(\d+)\.pt", p.name)
        if m:
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def latest_checkpoint(exp_dir) -> Optional[Path]:
    """The resumable checkpoint with the most training steps (`checkpoint-*.pt` or `epoch-*.pt`), or None.

    Unreadable files are skipped with a warning, so a damaged newest file falls back to the one before it.
    """
    candidates = []
    for p in list(checkpoint_files(exp_dir)) + list(epoch_files(exp_dir).values()):
        try:
            ckpt = load_checkpoint(p, mmap=True)
        except CheckpointError as e:
            logger.warning("skipping %s for resume: %s", p, e)
            continue
        if "optimizer" in ckpt:
            candidates.append((int(ckpt["step"]), p.name.startswith("epoch-"), p))
    return max(candidates)[2] if candidates else None


def remove_stale_temp_files(exp_dir) -> None:
    """Delete the temporary files of writes that a killed process left behind (`.NAME.XXXXXXXX.tmp*`, see
    mtp_asr.utils.atomic_path): they are never complete, and nothing else would remove them."""
    for p in Path(exp_dir).glob(".*.tmp*"):
        if p.is_file() and re.fullmatch(r"\..+\.[a-z0-9_]{8}\.tmp(\..+)?", p.name):
            logger.warning("removing %s, left by an interrupted write", p)
            p.unlink(missing_ok=True)


def remove_old_checkpoints(exp_dir, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for p in checkpoint_files(exp_dir)[:-keep_last]:
        p.unlink(missing_ok=True)


def average_state_dicts(paths) -> dict:
    """Element-wise mean of the models in `paths` (float tensors; integer buffers are taken from the last)."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    avg, dtypes, n = None, None, 0
    for p in paths:
        sd = load_checkpoint(p)["model"]
        if avg is None:
            avg = {k: v.clone().double() if v.is_floating_point() else v.clone() for k, v in sd.items()}
            dtypes = {k: v.dtype for k, v in sd.items()}
        else:
            if sd.keys() != avg.keys():
                raise CheckpointError(f"{p} holds a different model than {paths[0]} (parameter names differ)")
            for k, v in sd.items():
                if v.is_floating_point():
                    avg[k] += v.double()
                else:
                    avg[k] = v.clone()
        n += 1
    return {k: (v / n).to(dtypes[k]) if v.is_floating_point() else v for k, v in avg.items()}
