"""Draft-tree shapes (`--draft-tree`), their names in result tables, and the best shape of N nodes for a model.

No torch here: `mtp-asr summarize` names trees without importing it.

A shape is a set of rank paths, one per node: (r_2, ..., r_d) is the node reached by head 2's rank-r_2 token (0: its
best), then head 3's rank-r_3 token, and so on; every prefix of a node's path is a node too. It is written as
- widths, `3,2,1`: the product of each head's top-w tokens (3 + 6 + 6 = 15 nodes; `1,1,1` is the chain), or
- nodes, `0;1;0.0;0.1;0.0.0`: the paths one by one, ranks joined by '.', as `best_tree` writes them.

Why sparse shapes (Medusa's "optimised tree", Cai et al. 2024): head 2's second choice is right far more often than
head 4's fourth choice after head 3's third, yet a product tree spends as many nodes on each such combination.
`best_tree` keeps the N paths that the heads got right most often on held-out text (`mtp-asr draft-tree`).
"""
import itertools
from collections import Counter
from typing import Sequence


def product_paths(widths: Sequence[int]) -> tuple:
    """Every rank path of the product tree, shallow ones first."""
    return tuple(p for d in range(1, len(widths) + 1) for p in itertools.product(*(range(w) for w in widths[:d])))


def parse_tree(text: str) -> tuple:
    """`--draft-tree` text -> its rank paths (see the module docstring); '' -> () (a chain)."""
    text = text.strip()
    if not text:
        return ()
    if ";" in text or "." in text or text == "0":
        try:
            paths = tuple(tuple(int(r) for r in node.split(".")) for node in text.split(";"))
        except ValueError:
            raise ValueError(f"--draft-tree nodes must be rank paths like 0;1;0.0 (got {text!r})") from None
        check_paths(paths, text)
        return paths
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise ValueError(f"--draft-tree must be widths per head 2..K (e.g. 3,2,1) or rank paths (e.g. 0;1;0.0) "
                         f"(got {text!r})") from None
    if min(widths) < 1:
        raise ValueError(f"--draft-tree widths must be >= 1 (got {text!r})")
    return product_paths(widths)


def check_paths(paths: Sequence[tuple], text: str = "") -> None:
    """Ranks >= 0, no node twice, and every node's parent present."""
    seen = set(paths)
    if len(seen) != len(paths) or any(not p or min(p) < 0 for p in paths):
        raise ValueError(f"--draft-tree nodes must be distinct rank paths of ranks >= 0 (got {text or paths!r})")
    orphans = [p for p in paths if len(p) > 1 and p[:-1] not in seen]
    if orphans:
        raise ValueError(f"--draft-tree node {'.'.join(map(str, orphans[0]))} lacks its parent "
                         f"{'.'.join(map(str, orphans[0][:-1]))} (got {text or paths!r})")


def tree_depth(paths: Sequence[tuple]) -> int:
    return max((len(p) for p in paths), default=0)


def tree_name(text: str) -> str:
    """'4x4x4' for widths, '24nodes' for a node list, '' for no tree (the default chain) — in result-file names and
    tables. A chain given explicitly keeps its name ('1x1'), so that its results never take the default chain's
    files: on a model with more heads it is a shorter one."""
    paths = parse_tree(text) if text else ()
    if ";" in text or "." in text or text == "0":
        return f"{len(paths)}nodes"
    return text.replace(",", "x")


def nodes_text(paths: Sequence[tuple]) -> str:
    return ";".join(".".join(map(str, p)) for p in paths)


def best_tree(counts: Counter, num_nodes: int, max_depth: int) -> tuple:
    """The prefix-closed set of `num_nodes` rank paths (at most `max_depth` deep) that the most roots would accept,
    given `counts[path]`: at how many roots heads 2, 3, ... ranked the greedy tokens exactly so (every prefix
    counted). A root accepts as many drafts as the deepest node on its path, i.e. one per node of its path in the
    tree, so the total accepted is the sum of the chosen nodes' counts; a child never counts more than its parent, so
    the top `num_nodes` (parents first on ties) are prefix-closed and the best choice. When fewer paths ever
    matched, the tree is filled up with the children of its nodes of the lowest rank sum (never seen, so any guess)."""
    seen = [p for p in counts if len(p) <= max_depth and counts[p] > 0]
    paths = sorted(seen, key=lambda p: (-counts[p], len(p), p))[:num_nodes]
    chosen = set(paths)
    while len(paths) < num_nodes:
        frontier = {(0,)} | {q[:-1] + (q[-1] + 1,) for q in chosen}
        frontier |= {q + (0,) for q in chosen if len(q) < max_depth}
        nxt = min(frontier - chosen, key=lambda p: (sum(p), len(p), p))
        paths.append(nxt)
        chosen.add(nxt)
    paths = tuple(sorted(paths, key=lambda p: (len(p), p)))
    check_paths(paths)
    return paths
