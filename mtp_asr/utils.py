"""Small shared helpers: logging, atomic file writes, progress lines with rate and ETA."""
import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
logger = logging.getLogger("mtp_asr")
_UMASK = os.umask(0)
os.umask(_UMASK)


def setup_logging(level: int = logging.INFO, log_file: Optional[Path] = None) -> None:
    """Log lines like icefall's: time, level, file:line, message; to stderr and optionally a file."""
    fmt = "%(asctime)s %(levelname)s [%(filename)s:%(lineno)d] %(message)s"
    handlers = [logging.StreamHandler()]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level, format=fmt, handlers=handlers, force=True)


@contextlib.contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename, on error it is removed.

    Readers therefore see either the old file or the complete new one, never a half-written file.
    The temporary name keeps the file's suffixes (e.g. .jsonl.gz) because some writers choose a format by them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffixes = suffix or "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffixes}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results should be as readable as any other file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


class Progress:
    """Periodic progress log lines (done/total, rate, ETA): readable in log files, unlike a redrawn bar."""

    def __init__(self, desc: str, total: Optional[float] = None, unit: str = "it", every: float = 10.0):
        self.desc, self.total, self.unit, self.every = desc, total, unit, every
        self.done = 0.0
        self.start = self.last = time.monotonic()

    def update(self, n: float = 1.0, extra: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            logger.info("%s %s", self.desc, self.status(extra))

    def status(self, extra: str = "") -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        text = f"{self.done:.0f}" + (f"/{self.total:.0f}" if self.total else "") + f" {self.unit}, {rate:.2f} {self.unit}/s"
        if self.total and rate > 0:
            text += f", ETA {format_seconds((self.total - self.done) / rate)}"
        return text + (f", {extra}" if extra else "")

    def close(self, extra: str = "") -> None:
        logger.info("%s done: %s in %s", self.desc, self.status(extra), format_seconds(time.monotonic() - self.start))


def progress(items: Iterable[T], desc: str, total: Optional[int] = None, every: float = 10.0) -> Iterator[T]:
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    bar = Progress(desc, total, every=every)
    for item in items:
        yield item
        bar.update()
    bar.close()


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@contextlib.contextmanager
def cpu_threads(n: int, device):
    """torch's intra-op threads set to n for the block on the CPU (n = 0, or another device: unchanged). Decoder
    loops use it: their matrix products have a few rows, and with passive OpenMP waiting (mtp_asr.cli) a second
    thread costs more to wake than it saves (`DecodeSettings.decoder_threads`)."""
    import torch

    if n <= 0 or device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
