"""`mtp-asr distill-heads`: self-distillation of MTP heads 2..K on a frozen model (beyond the paper; the
self-distillation of Medusa-2, Cai et al. 2024).

Why: `mtp-verify` accepts head k's draft when it equals the token greedy decoding emits there, so what greedy
decoding emits, not the reference transcript, is what heads 2..K must predict. Wherever the model is not perfect
the two differ, and heads trained on references spend their capacity on tokens the trunk will not emit. Here they
learn the model's own continuation instead (measured on the demo in egs/synth/asr/RESULTS.md).

1. Self-labels: the cuts decoded with `mtp-verify` (exactly greedy's tokens, in fewer decoder calls).
2. Cache: one teacher-forced pass of the frozen model over the self-labels keeps, per batch, the trunk's last hidden
   states, their rotary positions and the heads' labels (a hypothesis stopped at the length limit gets no EOS
   target: the model never emitted one there).
3. Fit: AdamW on heads 2..K alone over the cached batches, on the greedy tokens (default) or on head 1's whole
   distribution where it chose them (`soft_targets`, KL distillation). Every 20th batch (the last, with fewer) is held
   out to report how often each head agrees with greedy decoding, before and after.

Hard or soft (measured on the demo, egs/synth/asr/RESULTS.md): greedy tokens give the most accepted drafts, but
heads that imitate the greedy path become confident about it, and mtp-beam, which scores with their probabilities,
explores less (fewer calls, worse WER); soft targets keep the heads' probabilities calibrated at a few accepted
drafts less.

Head 1 and the trunk are not touched, so greedy, mtp-verify and ctc-verify transcripts stay exactly the same (only
their decoder calls change); mtp-threshold and mtp-beam, which trust the heads' probabilities, change.
"""
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from mtp_asr.data.dataset import AsrDataset, sample_cuts
from mtp_asr.decode.runner import DecodeSettings, batches_by_size, decode_cuts
from mtp_asr.model.build import load_speech_model
from mtp_asr.model.lm import IGNORE, mtp_labels
from mtp_asr.model.speech_llama import SpeechLlama
from mtp_asr.train.average import MODEL_KEYS
from mtp_asr.train.checkpoint import load_checkpoint, save_checkpoint
from mtp_asr.train.trainer import freeze_parts
from mtp_asr.utils import Progress

logger = logging.getLogger("mtp_asr")
FROZEN = ("encoder", "adapter", "decoder")  # everything but heads 2..K (the decoder includes head 1)
HOLD_OUT_EVERY = 20  # every 20th cached batch (the last one if there are fewer) measures agreement, not training


@dataclass
class DistillSettings:
    steps: int = 2000  # optimizer steps, one cached batch each
    lr: float = 3e-3
    batch_size: int = 16  # utterances per batch when labelling and caching
    max_cuts: int = 5000  # the cache holds every cut's hidden states in memory: a random subset of at most this many
    seed: int = 0
    soft_targets: bool = False  # fit head 1's distributions instead of its greedy tokens

    def __post_init__(self):
        if self.steps < 1 or self.lr <= 0 or self.batch_size < 1 or self.max_cuts < 1:
            raise ValueError("distill-heads: --steps, --lr, --batch-size and --max-cuts must be positive")


@dataclass
class CachedBatch:
    hidden: torch.Tensor  # (B, T, d) the trunk's last hidden states (before the final norm)
    positions: torch.Tensor  # (B, T) their rotary positions
    labels: list  # per head (1..K), (B, T) token ids or IGNORE


@torch.inference_mode()
def self_labels(model: SpeechLlama, tokenizer, cuts, batch_size: int) -> dict:
    """cut id -> (greedy tokens, whether EOS ended them), decoded with mtp-verify (the same tokens as greedy)."""
    res = decode_cuts(model, tokenizer, cuts, DecodeSettings("mtp-verify"), batch_size, desc="self-labels")
    return {cut_id: (res.tokens[cut_id], res.finished[cut_id]) for cut_id in res.tokens}


@torch.no_grad()  # not inference mode: the cached tensors become inputs of the heads' backward pass
def cache_trunk(model: SpeechLlama, cuts, labels: dict, batch_size: int) -> list:
    """Teacher-forced hidden states of the frozen trunk on each cut's self-labels (cuts without one are left out)."""
    lm, device = model.lm, next(model.parameters()).device
    dataset = AsrDataset(None)
    cached = []
    todo = [c for c in cuts if c.id in labels]
    bar = Progress("caching trunk states", total=len(todo), unit="utts")
    for group in batches_by_size(todo, batch_size):
        batch = dataset[group]
        if not batch["cut_ids"]:
            continue
        enc = model.encode(batch["feats"].to(device), batch["feat_lens"].to(device))
        prefix, prefix_lens = model.prompt(enc.audio, enc.audio_lens)
        tokens = [labels[c][0] for c in batch["cut_ids"]]
        x, head1 = lm.append_tokens(prefix, prefix_lens, tokens)
        for row, cut_id in enumerate(batch["cut_ids"]):
            if not labels[cut_id][1]:  # stopped at the length limit: no EOS target
                head1[row, prefix_lens[row] + len(tokens[row]) - 1] = IGNORE
        positions = lm.positions(prefix_lens, x.shape[1])
        hidden = lm.decoder(x, positions=positions)
        cached.append(CachedBatch(hidden, positions, mtp_labels(head1, lm.num_heads)))
        bar.update(len(group))
    bar.close()
    return cached


def _head_logits(lm, batch: CachedBatch) -> list:
    """Per head 2..K, at the positions that have a label: its logits (N_k, V), the greedy tokens (N_k,) and head 1's
    logits at the positions where head 1 chose those tokens (N_k, V: the soft targets)."""
    states = lm.heads.states(lm.decoder, batch.hidden, positions=batch.positions, labels=batch.labels[0])
    out = []
    for k in range(1, lm.num_heads):
        rows, cols = (batch.labels[k] != IGNORE).nonzero(as_tuple=True)
        logits = lm.heads.logits(lm.decoder, k, states[k][rows, cols]).float()
        with torch.no_grad():  # head k at position i predicts what head 1 chose at position i + k - 1 (1-based k)
            teacher = lm.heads.logits(lm.decoder, 0, states[0][rows, cols + k]).float()
        out.append((logits, batch.labels[k][rows, cols], teacher))
    return out


@torch.no_grad()
def agreement(lm, batches: list) -> list:
    """Per head 2..K: the fraction of labelled positions where its argmax is the greedy token."""
    right = torch.zeros(lm.num_heads - 1)
    total = torch.zeros(lm.num_heads - 1)
    for batch in batches:
        for k, (logits, lab, _) in enumerate(_head_logits(lm, batch)):
            right[k] += (logits.argmax(-1) == lab).sum().cpu()
            total[k] += len(lab)
    return (right / total.clamp(min=1)).tolist()


def fit_heads(lm, batches: list, steps: int, lr: float, seed: int = 0, soft_targets: bool = False) -> None:
    """AdamW on heads 2..K only, over `batches` in a fresh random order each pass; the targets are the greedy tokens,
    or with `soft_targets` head 1's distributions there (KL distillation)."""
    params = list(lm.heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    weights = lm.head_weights
    g = torch.Generator().manual_seed(seed)
    order: list = []
    bar = Progress("fitting heads", total=steps, unit="steps")
    for step in range(steps):
        if not order:
            order = torch.randperm(len(batches), generator=g).tolist()
        loss = sum(weights[k + 1] * F.cross_entropy(logits, teacher.softmax(-1) if soft_targets else lab)
                   for k, (logits, lab, teacher) in enumerate(_head_logits(lm, batches[order.pop()])) if len(lab))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1, f"loss {loss.detach().item():.3f}")
    bar.close()


def distill_heads(checkpoint: Path, manifests: Sequence[Path], out: Path, settings: DistillSettings,
                  device: Optional[torch.device] = None) -> dict:
    """Self-distil heads 2..K of `checkpoint` on the cuts of `manifests`; write the model to `out` (model only,
    decodable on its own, written atomically), with the original heads if the fitted ones agree less with greedy
    decoding on held-out positions. Returns the held-out agreement per head, before and after, and which heads were
    kept."""
    model, tokenizer, _ = load_speech_model(checkpoint, device or "cpu")
    lm = model.lm
    if lm.num_heads < 2:
        raise ValueError(f"{checkpoint} has one head (plain next-token prediction): there are no heads to distil")
    freeze_parts(model, FROZEN)
    cuts = sample_cuts(manifests, settings.max_cuts, settings.seed)
    labels = self_labels(model, tokenizer, cuts, settings.batch_size)
    cached = cache_trunk(model, cuts, labels, settings.batch_size)
    cached = [b for b in cached if (b.labels[-1] != IGNORE).any()]  # the last head has the fewest labels
    steps = settings.steps if cached else 0
    before = after = []
    kept = "original"
    if cached:
        held = set(range(HOLD_OUT_EVERY - 1, len(cached), HOLD_OUT_EVERY)) or {len(cached) - 1}
        held_out = [cached[i] for i in sorted(held)]
        train = [b for i, b in enumerate(cached) if i not in held] or held_out  # a single batch does both
        before = agreement(lm, held_out)
        original = {k: v.detach().clone() for k, v in lm.heads.state_dict().items()}
        fit_heads(lm, train, steps, settings.lr, settings.seed, settings.soft_targets)
        after = agreement(lm, held_out)
        logger.info("heads 2..%d agree with greedy decoding on held-out positions: %s before, %s after",
                    lm.num_heads, " / ".join(f"{a:.3f}" for a in before), " / ".join(f"{a:.3f}" for a in after))
        # Heads trained jointly on much data can already match the model's own output better than a short fit on a
        # few hundred cuts: never hand back heads that agree less (summed over heads, a proxy for tokens per call).
        kept = "distilled" if sum(after) > sum(before) else "original"
        if kept == "original":
            lm.heads.load_state_dict(original)
            logger.warning("the fitted heads agree less with greedy decoding than the original ones: %s keeps the "
                           "original heads (try more --steps or --max-cuts, or a lower --lr)", out)
    else:  # an untrained model; a recipe goes on with the heads as they are
        logger.warning("%s: every greedy transcript is shorter than %d tokens, so heads 2..%d have nothing to learn: "
                       "they are written unchanged", checkpoint, lm.num_heads, lm.num_heads)
    src = load_checkpoint(checkpoint, mmap=True)
    state = {k: src[k] for k in MODEL_KEYS if k in src}
    state["model"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    report = {"checkpoint": str(checkpoint), "cuts": [str(m) for m in manifests], "num_cuts": len(labels),
              "steps": steps, "lr": settings.lr, "agreement_before": before, "agreement_after": after,
              "heads": kept}
    state["distilled_heads"] = report
    save_checkpoint(out, state)
    logger.info("wrote %s", out)
    return report
