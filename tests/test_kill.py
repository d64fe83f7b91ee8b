"""SIGKILL at random moments, one of them in the middle of a checkpoint write: the newest complete checkpoint stays
intact, at most one checkpoint interval of work is lost, and the resumed run ends with exactly the parameters of an
uninterrupted one."""
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtp_asr.train.checkpoint import latest_checkpoint, load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import make_corpus, tiny_train_config, write_config  # noqa: E402

SAVE_EVERY = 2
# Runs `mtp-asr` with torch.save slowed down for checkpoints: half the bytes, a pause, the rest. A kill in the pause
# lands in the middle of a checkpoint write, which is otherwise too quick to hit on purpose.
LAUNCHER = """
import io, os, sys, time
import torch
_save = torch.save
def slow_save(obj, f, *args, **kwargs):
    name = os.path.basename(os.fspath(f)) if isinstance(f, (str, os.PathLike)) else ""
    if not name.startswith((".checkpoint-", ".epoch-")):
        return _save(obj, f, *args, **kwargs)
    buf = io.BytesIO()
    _save(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    with open(f, "wb") as out:
        out.write(data[: len(data) // 2])
        out.flush()
        time.sleep(0.6)
        out.write(data[len(data) // 2:])
torch.save = slow_save
from mtp_asr.cli import main
sys.exit(main())
"""


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same in every run: thread counts change float sums


def train_command(launcher: Path, cfg: Path, exp: Path) -> list:
    return [sys.executable, str(launcher), "train", "-c", str(cfg), "--exp-dir", str(exp)]


def start(launcher: Path, cfg: Path, exp: Path) -> subprocess.Popen:
    return subprocess.Popen(train_command(launcher, cfg, exp), cwd=exp.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)


def run_to_end(launcher: Path, cfg: Path, exp: Path) -> None:
    proc = subprocess.run(train_command(launcher, cfg, exp), cwd=exp.parent, capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]


def logged_steps(exp: Path) -> int:
    log = exp / "log" / "log-train-rank0.txt"
    return len(re.findall(r" step \d+/", log.read_text())) if log.is_file() else 0


def partial_checkpoints(exp: Path) -> list:
    return [p for p in exp.glob(".checkpoint-*.tmp*") if p.stat().st_size > 0] if exp.is_dir() else []


def kill(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGKILL)
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGKILL, log
    return log


def last_logged_step(log: str) -> int:
    steps = [int(s) for s in re.findall(r" step (\d+)/\d+ ", log)]
    return max(steps, default=0)


def check_after_kill(exp: Path, log: str) -> int:
    """The newest complete checkpoint loads, and it is at most one interval behind the last step the run logged."""
    latest = latest_checkpoint(exp)
    step = int(load_checkpoint(latest)["step"]) if latest else 0
    assert step >= last_logged_step(log) - SAVE_EVERY, (step, log[-2000:])
    return step


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    cfg = write_config(tmp_path / "train.yaml", tiny_train_config(corpus, save_every_n=SAVE_EVERY, keep_last_k=50,
                                                                   log_interval=1))
    launcher = tmp_path / "slow_save_mtp_asr.py"
    launcher.write_text(LAUNCHER)
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_to_end(launcher, cfg, full)

    # 1. In the middle of writing the second checkpoint: the first one is the newest complete one.
    proc = start(launcher, cfg, cut)
    deadline = time.time() + 300
    while len(list(cut.glob("checkpoint-*.pt"))) < 1 or not partial_checkpoints(cut):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.02)
    writing = partial_checkpoints(cut)[0]
    log = kill(proc)
    assert writing.exists(), "the kill was meant to land during the write"
    killed_step = int(re.match(r"\.checkpoint-(\d+)\.pt\.", writing.name).group(1))
    assert check_after_kill(cut, log) >= killed_step - SAVE_EVERY
    with pytest.raises(Exception):  # the half-written file is really half a checkpoint, and never loaded
        torch.load(writing, weights_only=True)

    # 2. At random moments once training is under way again (seeded, so a failure can be replayed).
    rng = random.Random(0)
    steps = []
    for _ in range(3):
        before = logged_steps(cut)
        proc = start(launcher, cfg, cut)
        while logged_steps(cut) == before and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:  # finished before the kill: nothing left to interrupt
            break
        log = kill(proc)
        steps.append(check_after_kill(cut, log))
    assert steps == sorted(steps), "a resumed run must not fall behind the checkpoint it resumed from"

    # 3. Resume to the end: the leftovers of killed writes are cleaned up, and the result is the uninterrupted one.
    run_to_end(launcher, cfg, cut)
    assert not list(cut.glob(".*.tmp*"))
    a, b = load_checkpoint(full / "epoch-2.pt")["model"], load_checkpoint(cut / "epoch-2.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
