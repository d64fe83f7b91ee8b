"""Draft trees for verification decoding: several candidate continuations checked in one decoder call.

Blockwise parallel decoding verifies one chain of drafts: head k's top token for position +k. When head 2's top
token is wrong, the call keeps nothing even if its second choice was right. A draft tree (Medusa's tree attention,
Cai et al. 2024) verifies several combinations of the heads' top tokens at once: a node is one candidate token,
placed one rotary position after its parent and attending only to the cache and to its ancestors, so every
root-to-node path is scored exactly as if it had been fed alone. A node is accepted when its token is head 1's
argmax at its parent and its parent was accepted; siblings hold different tokens, so the accepted nodes form one
path, and the output stays identical to greedy decoding. After the call the accepted path's keys and values are
moved to the cache slots a chain would have used (`KVCache.move`).

The tree's shape is a set of rank paths (`mtp_asr.decode.tree_spec`): the product of the heads' top-w_k lists
(widths 1,1,1 are the chain, 3,2,1 has 3 + 6 + 6 = 15 nodes), or any prefix-closed set of paths, such as the N that a
model's heads get right most often (`mtp-asr draft-tree`). External drafts (ctc-verify's CTC continuation) are
one more path, merged into the same trie.
"""
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor


@dataclass
class DraftTree:
    """Nodes in insertion order (a parent always before its children); parent -1 is the root, the position that
    precedes the drafts. sources: 0 an external draft, k >= 2 head k."""

    tokens: list = field(default_factory=list)
    parents: list = field(default_factory=list)
    sources: list = field(default_factory=list)

    @classmethod
    def from_paths(cls, paths: Sequence[tuple]) -> "DraftTree":
        """The trie of (tokens, sources) paths from the root; a shared prefix is one set of nodes (the first path's
        sources)."""
        tree, index = cls(), {}
        for tokens, sources in paths:
            parent = -1
            for tok, src in zip(tokens, sources):
                key = (parent, tok)
                if key not in index:
                    index[key] = len(tree.tokens)
                    tree.tokens.append(tok)
                    tree.parents.append(parent)
                    tree.sources.append(src)
                parent = index[key]
        return tree

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return all(p == n - 1 for n, p in enumerate(self.parents))

    def depths(self) -> list:
        out = []
        for p in self.parents:
            out.append(1 if p < 0 else out[p] + 1)
        return out

    def path(self, node: int) -> list:
        """Node indices from the root's child down to `node` (empty for the root, -1)."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]


def head_paths(candidates: Sequence[Sequence[int]], rank_paths: Sequence[tuple]) -> list:
    """(tokens, sources) of each node's path (`mtp_asr.decode.tree_spec`): candidates[j] are head (j+2)'s tokens, best
    first."""
    return [([candidates[j][r] for j, r in enumerate(ranks)], list(range(2, 2 + len(ranks)))) for ranks in rank_paths]


class TreeBatch:
    """The drafts of a decoder call, one tree per row, after each row's pending tokens; tensors (B, q) over nodes.
    When every tree is a chain (plain blockwise parallel decoding) no tree geometry is built."""

    def __init__(self, trees: Sequence[DraftTree], n_pending: Tensor, width: int):
        self.trees = list(trees)
        device = n_pending.device
        self.q = q = max([len(t) for t in trees] + [0])
        pad = lambda xs, fill: xs + [fill] * (q - len(xs))  # noqa: E731
        self.tokens = torch.tensor([pad(t.tokens, 0) for t in trees], dtype=torch.long).view(len(trees), q)
        self.valid = torch.arange(q) < torch.tensor([len(t) for t in trees])[:, None]
        self.chain = all(t.is_chain for t in trees)
        self.offsets = self.visible = None
        if not self.chain:
            self.parents = torch.tensor([pad(t.parents, -1) for t in trees], dtype=torch.long)
            self.depth = torch.tensor([pad(t.depths(), 0) for t in trees], dtype=torch.long)
            self.max_depth = int(self.depth.max())
            self.offsets, self.visible = (x.to(device) for x in self._geometry(n_pending.cpu(), width))
            self.parents, self.depth = self.parents.to(device), self.depth.to(device)
        self.tokens, self.valid = self.tokens.to(device), self.valid.to(device)

    def _geometry(self, n_pending: Tensor, width: int) -> tuple:
        """Rotary offsets (B, T) from each row's cache length and which block positions each one sees (B, T, T):
        pending tokens (and padding) causally, a node the pending tokens, its ancestors and itself."""
        B, q = self.parents.shape
        rows = torch.arange(B)[:, None]
        # ancestors[b, n, m]: node m is node n or one of its ancestors (follow the parents up the tree)
        ancestors = torch.eye(q, dtype=torch.bool).repeat(B, 1, 1)
        up = self.parents
        for _ in range(self.max_depth - 1):
            hit = up >= 0
            ancestors[rows.expand(-1, q)[hit], torch.arange(q).expand(B, -1)[hit], up[hit]] = True
            up = torch.where(hit, self.parents.gather(1, up.clamp(min=0)), up)
        t = torch.arange(width)
        node = t[None, :] - n_pending[:, None]  # (B, T): node index of each block position
        is_node = (node >= 0) & (node < self.valid.sum(1, keepdim=True))
        n = node.clamp(0, max(q - 1, 0))
        sees_ancestor = ancestors[rows[:, :, None], n[:, :, None], n[:, None, :]] & is_node[:, None, :]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        visible = torch.where(is_node[:, :, None], (node < 0)[:, None, :] | sees_ancestor, causal)
        # Padding after a row's nodes takes the root's position: it is never attended to, and counting on from the
        # block's width could run past the rotary table near the decoder's length limit.
        root = (n_pending - 1)[:, None]
        offsets = torch.where(is_node, root + self.depth.gather(1, n), torch.where(node < 0, t, root))
        return offsets, visible

    def accept(self, head1: Tensor) -> tuple[Tensor, Tensor]:
        """head1 (B, q+1): head 1's argmax at the root (column 0) and at each node (column 1+n). Returns the accepted
        depth per row and the column of the last kept position (0: the root)."""
        B = head1.shape[0]
        if not self.q:
            zero = torch.zeros(B, dtype=torch.long, device=head1.device)
            return zero, zero
        if self.chain:  # node n's parent is node n-1: the leading run of matches
            accepted = (self.valid & (self.tokens == head1[:, :-1])).long().cumprod(dim=1).sum(dim=1)
            return accepted, accepted
        ok = self.valid & (self.tokens == head1.gather(1, self.parents + 1))
        accepted = ok
        root = torch.ones(B, 1, dtype=torch.bool, device=head1.device)
        for _ in range(self.max_depth - 1):  # a node stays accepted if its parent is
            accepted = ok & torch.cat([root, accepted], 1).gather(1, self.parents + 1)
        depth = torch.where(accepted, self.depth, 0)
        best, node = depth.max(dim=1)
        return best, torch.where(best > 0, node + 1, 0)


def move_plan(batch: TreeBatch, last_cols: list, n_pending: list, lengths: list) -> Optional[tuple]:
    """Cache slots to copy so the accepted path of each row sits where a chain would have put it:
    (row indices, source slots, target slots) as lists, or None when every accepted path is in place already."""
    rows, src, dst = [], [], []
    for i, (col, p, n) in enumerate(zip(last_cols, n_pending, lengths)):
        path = batch.trees[i].path(col - 1) if col else []
        if path != list(range(len(path))):
            rows.append(i)
            src.append([n + p + node for node in path])
            dst.append([n + p + j for j in range(len(path))])
    if not rows:
        return None
    width = max(len(s) for s in src)
    for s, d in zip(src, dst):  # pad with repeats of the last copy (idempotent)
        s += s[-1:] * (width - len(s))
        d += d[-1:] * (width - len(d))
    return rows, src, dst
