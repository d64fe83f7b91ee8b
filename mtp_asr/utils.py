"""Small shared helpers: logging, atomic file writes, progress lines with rate and ETA."""
import contextlib
import logging
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

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

    Readers therefore see either the old file or the complete new one, never a half-written file, and the data
    reaches the disk before the rename does (fsync), so a machine that crashes just after it cannot leave an empty
    file under the final name. The temporary name keeps the file's suffixes (e.g. .jsonl.gz) because some writers
    choose a format by them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffixes = suffix or "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffixes}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results should be as readable as any other file
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the rename is still atomic there
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path, marker: Optional[str] = None):
    """Yield a new empty directory beside `path`; on success it takes `path`'s place as a whole, on error it is
    removed: a directory of files that belong together (a model export) is never half old, half new. Its files get
    the permissions the umask allows (safetensors and mkstemp make private ones) and are synced before the swap.
    With `marker`, an existing `path` is replaced only when it is empty or holds `marker` (an earlier output of the
    same kind); without, `path` is the caller's own directory and replaced whatever it holds."""
    path = Path(path)
    if marker and path.exists() and not (path / marker).is_file() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{path}: exists and is not a model export (no {marker}); refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its directories are private (0700).
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            f.chmod(0o666 & ~_UMASK)
            _fsync(f)
        _replace_dir(tmp, path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, target: Path) -> None:
    """Put directory `new` at `target`; an old `target` is moved aside first and deleted only afterwards."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / target.name, target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


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
        text = (f"{self.done:.0f}" + (f"/{self.total:.0f}" if self.total else "")
                + f" {self.unit}, {rate:.2f} {self.unit}/s")
        if self.total and rate > 0:
            text += f", ETA {format_seconds((self.total - self.done) / rate)}"
        return text + (f", {extra}" if extra else "")

    def close(self, extra: str = "") -> None:
        logger.info("%s done: %s in %s", self.desc, self.status(extra), format_seconds(time.monotonic() - self.start))


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def pick_device(name: str = "auto", option: str = "--device"):
    """The torch device for `auto` (a GPU when there is one), `cpu`, `cuda` or `cuda:N`; anything else, or a GPU
    that is not there, is a ValueError naming `option`."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"{option} must be auto, cpu, cuda or cuda:N (got {name!r})")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option} {name}: no GPU is available on this machine")
    return device


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
