"""The synthetic demo corpus: run the recipe-side generator, then prepare its Kaldi data dirs as CutSets.

The generator lives in the repository (local/synth/make_corpus.py), not in the installed package, because it is
recipe code with heavy system dependencies (TTS engines, sox); it is found next to an editable install.
"""
import importlib.util
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import mtp_asr
from mtp_asr.data import PreparationError
from mtp_asr.data.prepare import prepare_kaldi
from mtp_asr.utils import logger

SPLITS = ("train", "dev", "test", "test_unseen_voice")


def generator_path() -> Path:
    return Path(mtp_asr.__file__).resolve().parents[1] / "local" / "synth" / "make_corpus.py"


def load_generator() -> Callable[..., dict]:
    """`make_corpus` from local/synth/make_corpus.py, imported by file path."""
    path = generator_path()
    if not path.is_file():
        raise PreparationError(
            f"the demo-corpus generator {path} is missing: `prepare synth` needs the source checkout "
            "(pip install -e . from the repository), not a plain install"
        )
    spec = importlib.util.spec_from_file_location("mtp_asr_local_make_corpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "make_corpus", None)):
        raise PreparationError(f"{path} defines no make_corpus() function")
    return module.make_corpus


def prepare_synth(
    out_dir, hours: float, seed: int = 0, jobs: int = 2, engines: Optional[Sequence[str]] = None,
    words: Optional[int] = None,
) -> Dict[str, Path]:
    """Generate OUT_DIR/corpus (Kaldi data dirs per split) and write OUT_DIR/cuts_<split>.jsonl.gz for each.
    `words`: the sentences' vocabulary, the most frequent N words (None: the generator's default)."""
    if hours <= 0:
        raise PreparationError(f"--hours must be positive (got {hours})")
    out_dir = Path(out_dir)
    corpus = out_dir / "corpus"
    make_corpus = load_generator()
    logger.info("generating %.3f h of synthetic speech (seed %d, %d jobs) in %s", hours, seed, jobs, corpus)
    vocab = {"vocab_size": words} if words else {}
    stats = make_corpus(corpus, hours, seed=seed, jobs=jobs, engines=list(engines) if engines else None, **vocab)
    logger.info("generator stats: %s", stats)
    present = [s for s in SPLITS if (corpus / s / "wav.scp").is_file()]
    if not present:
        raise PreparationError(f"the generator wrote no data dir ({', '.join(SPLITS)}) under {corpus}")
    if len(present) < len(SPLITS):
        logger.warning("the generator wrote no %s under %s", ", ".join(s for s in SPLITS if s not in present), corpus)
    return {split: prepare_kaldi(corpus / split, out_dir, split=split, jobs=jobs) for split in present}
