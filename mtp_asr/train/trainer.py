"""The training loop shared by `train` (speech), `pretrain-lm` (text) and `mwer`.

A task supplies the model, its batches and its loss; the loop owns everything else: DDP under `torchrun`, AdamW with
warm-up and decay, gradient accumulation and clipping, bf16 autocast on GPU, validation each epoch, TensorBoard
scalars and progress lines on rank 0, atomic checkpoints with exact resume, and faults (non-finite losses, GPU
out-of-memory, SIGINT/SIGTERM).

Exact resume: a checkpoint is written after an optimizer step and holds the model, optimizer, scheduler, torch RNG
and the position in the epoch (batches consumed). Resuming rebuilds the same epoch's batch order from the seed, skips
the consumed batches without loading them, restores the RNG and goes on; on the CPU the parameters then match an
uninterrupted run exactly.
"""
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from mtp_asr.train.checkpoint import (
    latest_checkpoint, load_checkpoint, remove_old_checkpoints, remove_stale_temp_files, rng_state, save_checkpoint,
    set_rng_state,
)
from mtp_asr.train.config import LoopConfig
from mtp_asr.utils import format_seconds, pick_device

logger = logging.getLogger("mtp_asr")


class TrainingError(RuntimeError):
    pass


class Task:
    """What the loop needs from a kind of training. Subclasses fill these in."""

    unit = "items"  # what `batch_weight` counts, for throughput lines ("audio-s", "tokens")

    def __init__(self, model: nn.Module):
        self.model = model

    def train_batches(self, epoch: int, skip: int, rank: int, world_size: int) -> Iterable:
        raise NotImplementedError

    def valid_batches(self) -> Iterable:
        raise NotImplementedError

    def num_train_batches(self, rank: int, world_size: int) -> int:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch) -> "LossOutput":  # noqa: F821 (mtp_asr.model.lm.LossOutput)
        raise NotImplementedError

    def batch_weight(self, batch) -> float:
        raise NotImplementedError

    def is_empty(self, batch) -> bool:
        return False

    def checkpoint_info(self) -> dict:
        """What a checkpoint needs to rebuild the model without the training config (config, tokenizer, kind)."""
        raise NotImplementedError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when started by torchrun (RANK/WORLD_SIZE set); gloo on CPU, NCCL on GPU."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def training_device(name: str, local_rank: int = 0) -> torch.device:
    """The config's `device`; on a GPU, the one of this process's local rank (torchrun)."""
    device = pick_device(name, "device")
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def lr_lambda(cfg, total_steps: int):
    warmup, schedule, floor = cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if schedule == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def freeze_parts(model: nn.Module, parts) -> list:
    """Freeze named parts and return their modules, which the loop keeps in eval mode (no dropout, no BatchNorm
    statistics updates), so a frozen part really stays as it was. `decoder` is the trunk with the LM head (head 1),
    `heads` are heads 2..K; freezing encoder, adapter and decoder trains the MTP heads alone on a frozen model,
    which keeps that model's greedy output."""
    lm = getattr(model, "lm", model)
    modules = {"encoder": [getattr(model, "encoder", None)], "adapter": [getattr(model, "adapter", None)],
               "decoder": [lm.decoder], "heads": [lm.heads]}
    frozen = [m for part in parts for m in modules[part] if m is not None]
    for m in frozen:
        m.requires_grad_(False)
    if "adapter" in parts and hasattr(model, "sep"):
        model.sep.requires_grad_(False)
    return frozen


class Trainer:
    def __init__(self, task: Task, cfg: LoopConfig, exp_dir, config_dict: dict, resume: bool = True):
        self.task, self.cfg, self.exp_dir = task, cfg, Path(exp_dir)
        self.config_dict, self.resume = config_dict, resume
        self.stop_signal = 0

    # ---- setup ------------------------------------------------------------------------------------------------
    def _setup(self):
        cfg = self.cfg
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = training_device(cfg.device, local_rank)
        self.dist = init_distributed(self.device)
        torch.manual_seed(cfg.seed)
        self.exp_dir.mkdir(parents=True, exist_ok=True)
        model = self.task.model.to(self.device)
        self.frozen = freeze_parts(model, cfg.freeze)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise TrainingError(f"freeze={cfg.freeze} leaves no parameter to train")
        self.model = model
        self.ddp = (nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
                    if self.dist.world_size > 1 else model)
        o = cfg.optim
        # fused: one kernel for all parameters (CPU and GPU); 2.8x faster steps than the per-tensor loop on the CPU.
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                           fused=True)
        batches = self.task.num_train_batches(self.dist.rank, self.dist.world_size)
        if batches == 0:
            raise TrainingError("the training data gives no batch (empty manifest, or everything filtered out)")
        self.batches_per_epoch = batches
        self.steps_per_epoch = math.ceil(batches / o.accum_grad)
        total = self.steps_per_epoch * cfg.num_epochs
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(o, self.total_steps))
        self.autocast = self.device.type == "cuda" and cfg.amp
        self.tb = None
        if self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.exp_dir / "tensorboard"))
        n_train = sum(p.numel() for p in params)
        n_all = sum(p.numel() for p in model.parameters())
        logger.info("device %s, world size %d, %.2fM parameters (%.2fM trained), %d batches/epoch/rank, %d steps",
                    self.device, self.dist.world_size, n_all / 1e6, n_train / 1e6, batches, self.total_steps)

    def _restore(self):
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        if self.dist.is_main:
            remove_stale_temp_files(self.exp_dir)
        path = latest_checkpoint(self.exp_dir) if self.resume else None
        if path is None:
            return
        ckpt = load_checkpoint(path, map_location=self.device)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        self.epoch, self.batch_in_epoch, self.step = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]
        logger.info("resumed from %s: epoch %d, batch %d, step %d", path, self.epoch + 1, self.batch_in_epoch,
                    self.step)

    def _state(self) -> dict:
        return {
            **self.task.checkpoint_info(),
            "model": self.model.state_dict(),
            "train_config": self.config_dict,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.step,
        }

    def save(self, name: str) -> None:
        if self.dist.is_main:
            save_checkpoint(self.exp_dir / name, self._state())
            logger.info("saved %s", self.exp_dir / name)

    # ---- the loop ---------------------------------------------------------------------------------------------
    def _agree(self, *flags: float) -> list:
        """Sum flags over ranks, so that every rank takes the same branch (skip, stop, end of epoch)."""
        t = torch.tensor(flags, dtype=torch.float64, device=self.device)
        if self.dist.world_size > 1:
            dist.all_reduce(t)
        return t.tolist()

    def _on_signal(self, signum, frame):
        logger.warning("received signal %d: saving a checkpoint after the current batch, then stopping", signum)
        self.stop_signal = signum

    def run(self) -> int:
        """Train to the end; returns 0, or 128 + signal number after a SIGINT/SIGTERM (checkpoint written)."""
        self._setup()
        self._restore()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = self._loop()
            if self.dist.world_size > 1:
                dist.barrier()  # no rank exits while another is still in a collective
            return code
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if self.tb is not None:
                self.tb.close()
            # No destroy_process_group(): tearing the gloo group down by hand aborted a rank after a finished run
            # ("terminate called without an active exception"), 2 of 42 runs of the quick demo's CTC stage with two
            # ranks; 0 of 60 when the group is left to the process exit.

    def _train_mode(self) -> None:
        self.model.train()
        for m in self.frozen:
            m.eval()

    def _finished(self) -> bool:
        return self.epoch >= self.cfg.num_epochs or (self.cfg.max_steps and self.step >= self.cfg.max_steps)

    def _loop(self) -> int:
        cfg = self.cfg
        start_time = time.monotonic()
        start_step = self.step
        while not self._finished():
            self._train_mode()
            stats = _Stats(self.task.unit)
            bad_in_row = 0
            empty_batches = used_batches = skipped_items = 0
            batches = iter(self.task.train_batches(self.epoch, self.batch_in_epoch, self.dist.rank,
                                                   self.dist.world_size))
            accumulated = 0
            while True:
                batch = next(batches, None)
                has_batch = batch is not None
                if has_batch and isinstance(batch, dict):
                    skipped_items += batch.get("num_skipped", 0)  # bad cuts the dataset dropped (it warned)
                if has_batch and self.task.is_empty(batch):
                    self.batch_in_epoch += 1
                    empty_batches += 1
                    continue
                # A signal is honoured between optimizer steps, where a checkpoint captures everything.
                n_missing, n_signal = self._agree(0.0 if has_batch else 1.0,
                                                  float(self.stop_signal != 0 and accumulated == 0))
                if n_signal:
                    self.stop_signal = self.stop_signal or signal.SIGTERM
                    self.save(f"checkpoint-{self.step}.pt")
                    logger.warning("stopped by signal %d at step %d; rerun to resume", self.stop_signal, self.step)
                    return 128 + int(self.stop_signal)
                if n_missing:
                    break
                self.batch_in_epoch += 1
                used_batches += 1
                out = self._forward_backward(batch, accumulated)
                if out is None:
                    if not any(p.grad is not None for p in self.optimizer.param_groups[0]["params"]):
                        accumulated = 0  # an OOM discarded the gradients of the group so far
                    bad_in_row += 1
                    if bad_in_row > cfg.max_bad_batches:
                        raise TrainingError(
                            f"{bad_in_row} batches in a row had a non-finite loss or ran out of memory; stopping "
                            f"(see the bad-batch-*.pt files in {self.exp_dir}). Try a lower learning rate."
                        )
                    continue
                bad_in_row = 0
                stats.add(out, self.task.batch_weight(batch))
                accumulated += 1
                if accumulated < cfg.optim.accum_grad:
                    continue
                accumulated = 0
                grad_norm = self._optimizer_step()
                stats.grad_norm = grad_norm
                if self.step % cfg.log_interval == 0:
                    self._log_progress(stats, start_time, start_step)
                    stats = _Stats(self.task.unit)
                if cfg.save_every_n and self.step % cfg.save_every_n == 0:
                    self.save(f"checkpoint-{self.step}.pt")
                    if self.dist.is_main:
                        remove_old_checkpoints(self.exp_dir, cfg.keep_last_k)
                if cfg.max_steps and self.step >= cfg.max_steps:
                    break
            self._check_skips(empty_batches, used_batches, skipped_items)
            if accumulated:  # the epoch's last batches did not fill an accumulation group
                self._optimizer_step()
            if cfg.max_steps and self.step >= cfg.max_steps and self.batch_in_epoch < self.batches_per_epoch:
                self._validate()
                self.save(f"checkpoint-{self.step}.pt")
                break
            self.epoch += 1
            self.batch_in_epoch = 0
            self._validate()
            self.save(f"epoch-{self.epoch}.pt")
        logger.info("training done: %d steps in %s", self.step - start_step,
                    format_seconds(time.monotonic() - start_time))
        self._check_ranks_agree()
        return 0

    def _check_skips(self, empty_batches: int, used_batches: int, skipped_items: int) -> None:
        """Report the epoch's skipped cuts; stop when nothing of it was usable, rather than "train" on nothing."""
        n_empty, n_used, n_skipped = self._agree(empty_batches, used_batches, skipped_items)
        if n_empty and not n_used:
            raise TrainingError(f"epoch {self.epoch + 1}: all {int(n_empty)} batches were empty, every cut was "
                                f"skipped ({int(n_skipped)}; see the warnings above for why)")
        if n_skipped and self.dist.is_main:
            logger.warning("epoch %d: %d cuts skipped (see the warnings above)", self.epoch + 1, n_skipped)

    def _check_ranks_agree(self) -> None:
        """DDP keeps replicas identical; check it (a cheap fingerprint per rank) rather than trust it."""
        with torch.no_grad():
            fp = torch.stack([sum(p.double().sum() for p in self.model.parameters()),
                              sum(p.double().pow(2).sum() for p in self.model.parameters())])
        if self.dist.world_size > 1:
            all_fp = [torch.zeros_like(fp) for _ in range(self.dist.world_size)]
            dist.all_gather(all_fp, fp.to(self.device))
            if any(not torch.equal(all_fp[0], f) for f in all_fp):
                raise TrainingError(f"ranks hold different parameters: fingerprints {[f.tolist() for f in all_fp]}")
        logger.info("parameter fingerprint on rank %d: %.10e %.10e", self.dist.rank, *fp.tolist())

    def _forward_backward(self, batch, accumulated: int):
        """Loss and gradients of one batch; None (and nothing learnt) for a non-finite loss, which leaves the
        gradients of the accumulation group so far as they are, or an OOM, which discards them (a backward pass may
        have added part of its gradients)."""
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                out = self.task.loss(self.ddp, batch)
            (n_bad,) = self._agree(0.0 if torch.isfinite(out.loss).item() else 1.0)
            if n_bad:
                self._save_bad_batch(batch, out)
                return None
            (out.loss / self.cfg.optim.accum_grad).backward()
            return out
        except torch.cuda.OutOfMemoryError:
            if self.dist.world_size > 1:
                raise
            logger.warning("out of GPU memory on a batch of %.1f %s; skipping it",
                           self.task.batch_weight(batch), self.task.unit)
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return None

    def _save_bad_batch(self, batch, out) -> None:
        path = self.exp_dir / f"bad-batch-epoch{self.epoch + 1}-batch{self.batch_in_epoch}-rank{self.dist.rank}.pt"
        keep = {k: v for k, v in batch.items() if isinstance(v, (torch.Tensor, list, int, float, str))} \
            if isinstance(batch, dict) else {"batch": batch}
        save_checkpoint(path, keep)
        logger.warning("non-finite loss (%s) at step %d; batch skipped and saved to %s", out.loss.item(), self.step,
                       path)

    def _optimizer_step(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return float(grad_norm)

    def _log_progress(self, stats: "_Stats", start_time: float, start_step: int) -> None:
        if not self.dist.is_main:
            return
        elapsed = time.monotonic() - start_time
        done = self.step - start_step
        eta = elapsed / max(done, 1) * (self.total_steps - self.step)
        lr = self.scheduler.get_last_lr()[0]
        logger.info("epoch %d step %d/%d (%.0f%%): %s, lr %.2e, grad-norm %.2f, ETA %s",
                    self.epoch + 1, self.step, self.total_steps, 100 * self.step / self.total_steps,
                    stats.summary(), lr, stats.grad_norm, format_seconds(eta))
        stats.write(self.tb, "train", self.step)
        self.tb.add_scalar("train/lr", lr, self.step)
        self.tb.add_scalar("train/grad_norm", stats.grad_norm, self.step)
        self.tb.add_scalar(f"train/throughput_{self.task.unit.replace('-', '_')}_per_s", stats.rate(), self.step)

    @torch.no_grad()
    def _validate(self) -> None:
        self.model.eval()
        stats = _Stats(self.task.unit)
        for batch in self.task.valid_batches():
            if self.task.is_empty(batch):
                continue
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                stats.add(self.task.loss(self.model, batch), self.task.batch_weight(batch))
        self._train_mode()
        if self.dist.is_main and stats.utts:
            where = f"epoch {self.epoch}" if self.batch_in_epoch == 0 else f"step {self.step} of epoch {self.epoch + 1}"
            logger.info("validation after %s (step %d): %s", where, self.step, stats.summary())
            stats.write(self.tb, "valid", self.step)
            self.tb.flush()


class _Stats:
    """Sums of per-head losses, hits and counts between two log lines (or over a validation pass)."""

    def __init__(self, unit: str):
        self.unit = unit
        self.loss_sum = self.correct = self.count = None
        self.ctc_sum, self.utts, self.weight, self.grad_norm = 0.0, 0, 0.0, 0.0
        self.metrics = {}  # name -> [numerator, denominator]
        self.start = time.monotonic()

    def add(self, out, weight: float) -> None:
        ls, c, n = out.head_loss_sum.detach().cpu(), out.head_correct.cpu(), out.head_count.cpu()
        if self.loss_sum is None:
            self.loss_sum, self.correct, self.count = ls.clone(), c.clone(), n.clone()
        else:
            self.loss_sum += ls
            self.correct += c
            self.count += n
        if out.ctc_loss_sum is not None:
            self.ctc_sum += float(out.ctc_loss_sum)
        self.utts += out.num_utts
        self.weight += weight
        for name, (num, den) in out.metrics.items():
            acc = self.metrics.setdefault(name, [0.0, 0.0])
            acc[0] += num
            acc[1] += den

    def rate(self) -> float:
        return self.weight / max(time.monotonic() - self.start, 1e-9)

    def has_heads(self) -> bool:
        return bool(self.count.sum() > 0)

    def head_losses(self) -> list:
        return (self.loss_sum / self.count.clamp(min=1)).tolist()

    def head_accs(self) -> list:
        return (self.correct / self.count.clamp(min=1)).tolist()

    def summary(self) -> str:
        if self.loss_sum is None:
            return "no batches"
        parts = []
        if self.has_heads():  # not in CTC-only training
            parts += [f"loss/head {' '.join(f'{x:.3f}' for x in self.head_losses())}",
                      f"acc/head {' '.join(f'{x:.3f}' for x in self.head_accs())}"]
        if self.ctc_sum:
            parts.append(f"ctc {self.ctc_sum / max(self.utts, 1):.2f}/utt")
        text = ", ".join(parts)
        for name, value in self.metric_values().items():
            text += f", {name.replace('_', ' ')} {value:.3f}"
        return text + f", {self.rate():.1f} {self.unit}/s"

    def metric_values(self) -> dict:
        return {name: num / den for name, (num, den) in self.metrics.items() if den}

    def write(self, tb, prefix: str, step: int) -> None:
        if tb is None or self.loss_sum is None:
            return
        if self.has_heads():
            for k, (loss, acc) in enumerate(zip(self.head_losses(), self.head_accs()), start=1):
                tb.add_scalar(f"{prefix}/loss_head{k}", loss, step)
                tb.add_scalar(f"{prefix}/acc_head{k}", acc, step)
            tb.add_scalar(f"{prefix}/loss", self.head_losses()[0], step)
        if self.ctc_sum:
            tb.add_scalar(f"{prefix}/ctc_loss", self.ctc_sum / max(self.utts, 1), step)
        for name, value in self.metric_values().items():
            tb.add_scalar(f"{prefix}/{name}", value, step)
