"""`mtp-asr draft-tree`: the draft-tree shape of N nodes that a model's heads get accepted most often.

The cuts are decoded greedily (with mtp-verify: the same tokens), the model is run once teacher-forced on its own
transcripts, and at every position (a possible root of a tree: where head 1 emits the next token) heads 2..K rank
the tokens greedy decoding emitted after it. A root would accept the drafts of a tree up to its deepest node whose
rank path (`mtp_asr.decode.tree_spec`) matches those ranks, so counting every rank-path prefix over the positions
gives, for any shape, how many drafts it would accept there, and `best_tree` picks the N nodes that accept most.
No independence between heads is assumed: the counts are of whole paths.

The estimate of tokens per call (1 + accepted drafts per root) weighs every position alike, where decoding only
visits the positions after each call's last emitted token; `mtp-asr benchmark` measures the real figure.
"""
import logging
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import torch

from mtp_asr.data.dataset import sample_cuts
from mtp_asr.decode.tree_spec import best_tree, nodes_text, product_paths
from mtp_asr.model.build import load_speech_model
from mtp_asr.model.lm import IGNORE
from mtp_asr.train.distill import cache_trunk, self_labels

logger = logging.getLogger("mtp_asr")
MAX_RANK = 16  # ranks counted per head; worse ones end a path (no useful tree reaches them)


@torch.no_grad()
def rank_counts(lm, batches: list, max_rank: int = MAX_RANK) -> tuple[Counter, int]:
    """(count per rank path, number of roots) over cached teacher-forced batches (`distill.cache_trunk`)."""
    counts, roots = Counter(), 0
    for batch in batches:
        states = lm.heads.states(lm.decoder, batch.hidden, positions=batch.positions, labels=batch.labels[0])
        rows, cols = (batch.labels[0] != IGNORE).nonzero(as_tuple=True)
        ranks = []
        for k in range(1, lm.num_heads):
            target = batch.labels[k][rows, cols]
            logits = lm.heads.logits(lm.decoder, k, states[k][rows, cols]).float()
            rank = (logits > logits.gather(-1, target.clamp(min=0)[:, None])).sum(-1)
            ranks.append(torch.where((target == IGNORE) | (rank >= max_rank), -1, rank))
        roots += len(rows)
        for path in torch.stack(ranks, 1).tolist() if ranks else []:
            for d in range(len(path)):
                if path[d] < 0:
                    break
                counts[tuple(path[:d + 1])] += 1
    return counts, roots


def tokens_per_call(counts: Counter, roots: int, paths: Sequence[tuple]) -> float:
    """Estimated tokens emitted per verification call with a tree of these rank paths."""
    return 1 + sum(counts[p] for p in paths) / max(roots, 1)


def fit_tree(checkpoint: Path, manifests: Sequence[Path], num_nodes: int, batch_size: int = 16,
             max_cuts: int = 500, seed: int = 0, avg: int = 1, device: Optional[torch.device] = None
             ) -> tuple[str, list]:
    """The best shape of `num_nodes` nodes for the model on these cuts, as `--draft-tree` text, and a table (rows of
    shape name, nodes, estimated tokens per call) comparing it with other sizes and with product trees."""
    model, tokenizer, _ = load_speech_model(checkpoint, device or "cpu", avg=avg)
    lm = model.lm
    if lm.num_heads < 2:
        raise ValueError(f"{checkpoint} has one head: there are no drafts to arrange in a tree")
    cuts = sample_cuts(manifests, max_cuts, seed)
    batches = cache_trunk(model, cuts, self_labels(model, tokenizer, cuts, batch_size), batch_size)
    counts, roots = rank_counts(lm, batches)
    if not roots:
        raise ValueError(f"no greedy transcript of the cuts in {', '.join(map(str, manifests))} has a token to "
                         f"verify: cannot fit a draft tree")
    depth = lm.num_heads - 1
    paths = best_tree(counts, num_nodes, depth)
    table = [("chain", depth, tokens_per_call(counts, roots, product_paths((1,) * depth)))]
    for widths in ((2,) + (1,) * (depth - 1), (3, 2) + (1,) * (depth - 2), (4,) * depth):
        if len(widths) == depth:
            shape = product_paths(widths)
            table.append((",".join(map(str, widths)), len(shape), tokens_per_call(counts, roots, shape)))
    for n in sorted({8, 16, 24, 32, 48, 64, num_nodes}):
        table.append((f"best {n}", n, tokens_per_call(counts, roots, best_tree(counts, n, depth))))
    for name, n, tpc in table:
        logger.info("%-10s %3d nodes: %.2f tokens per call (estimated on %d positions)", name, n, tpc, roots)
    matched = sum(1 for p in paths if counts[p])
    if matched < num_nodes:
        logger.warning("only %d rank paths were ever right on these cuts; the other %d nodes of the tree are guesses",
                       matched, num_nodes - matched)
    return nodes_text(paths), table
