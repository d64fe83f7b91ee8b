"""`mtp-asr average`: the mean of the last N epoch models, written as one decodable checkpoint."""
import logging
from pathlib import Path
from typing import Optional

from mtp_asr.model.build import averaged_paths
from mtp_asr.train.checkpoint import average_state_dicts, load_checkpoint, save_checkpoint

logger = logging.getLogger("mtp_asr")

# What a model-only checkpoint keeps from a training checkpoint.
MODEL_KEYS = ("kind", "model_config", "lm_config", "tokenizer", "ctc_tokenizer")


def average_epochs(exp_dir, epoch: int, avg: int, out: Optional[Path] = None) -> Path:
    exp_dir = Path(exp_dir)
    paths = averaged_paths(exp_dir / f"epoch-{epoch}.pt", avg)
    last = load_checkpoint(paths[-1], mmap=True)
    state = {k: last[k] for k in MODEL_KEYS if k in last}
    state["model"] = average_state_dicts(paths)
    state["averaged_from"] = [p.name for p in paths]
    out = Path(out) if out else exp_dir / f"avg-epoch-{epoch}-avg-{avg}.pt"
    save_checkpoint(out, state)
    logger.info("averaged %s -> %s", ", ".join(p.name for p in paths), out)
    return out
