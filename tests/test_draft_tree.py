"""Tree verification: several draft continuations per call (Medusa-style tree attention) keep mtp-verify and
ctc-verify identical to greedy decoding, score each path exactly as if it were fed alone, and save calls."""
from collections import Counter

import pytest
import torch

from model_fixtures import random_batch, reference_decode, single_thread, tiny_lm  # noqa: F401
from mtp_asr.decode.generate import generate
from mtp_asr.decode.tree import DraftTree, TreeBatch, head_paths
from mtp_asr.decode.tree_spec import best_tree, parse_tree, product_paths, tree_name
from mtp_asr.model.heads import HEAD_KINDS


def test_trie_of_paths():
    tree = DraftTree.from_paths([([5, 6, 7], [0, 0, 0]), ([5, 8], [2, 3]), ([9], [2])])
    assert tree.tokens == [5, 6, 7, 8, 9]
    assert tree.parents == [-1, 0, 1, 0, -1]
    assert tree.sources == [0, 0, 0, 3, 2]  # the shared 5 keeps the first path's source
    assert tree.depths() == [1, 2, 3, 2, 1]
    assert tree.path(3) == [0, 3] and tree.path(-1) == []
    assert not tree.is_chain and DraftTree.from_paths([([1, 2], [2, 3])]).is_chain
    paths = head_paths([[10, 11, 12], [20, 21]], product_paths((3, 2)))
    assert len(paths) == 3 + 6 and paths[0] == ([10], [2]) and paths[-1] == ([12, 21], [2, 3])
    assert len(DraftTree.from_paths(paths)) == 3 + 6
    sparse = head_paths([[10, 11, 12], [20, 21]], parse_tree("0;2;0.1"))
    assert sparse == [([10], [2]), ([12], [2]), ([10, 21], [2, 3])]


def test_tree_shapes_and_names():
    assert product_paths((3, 2)) == ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1))
    assert parse_tree("3,2") == product_paths((3, 2)) and parse_tree("") == ()
    assert parse_tree("0;1;0.0;0.0.3") == ((0,), (1,), (0, 0), (0, 0, 3))
    assert [tree_name(t) for t in ("4,4,4", "1,1,1", "", "0;1;0.0", "0;0.0")] == ["4x4x4", "1x1x1", "", "3nodes",
                                                                                     "2nodes"]
    for bad, message in [("3,x", "widths per head"), ("2,0", ">= 1"), ("0;1.x", "rank paths"),
                         ("0;0.1.0", "lacks its parent 0.1"), ("0;0", "distinct"), ("0;-1", ">= 0")]:
        with pytest.raises(ValueError, match=message):
            parse_tree(bad)


def test_best_tree_keeps_the_most_accepted_paths():
    """Counts of rank paths at 100 roots: the best 4 nodes are the 4 most counted, and a child that ties its
    parent or an unrelated node never comes before its parent."""
    counts = Counter({(0,): 60, (1,): 20, (2,): 5, (0, 0): 40, (0, 1): 6, (1, 0): 20, (0, 0, 0): 30, (1, 0, 0): 1})
    assert best_tree(counts, 4, 3) == ((0,), (1,), (0, 0), (0, 0, 0))  # (1,) before (1, 0), both 20
    assert best_tree(counts, 5, 3) == ((0,), (1,), (0, 0), (1, 0), (0, 0, 0))
    assert best_tree(counts, 8, 3) == tuple(sorted(counts, key=lambda p: (len(p), p)))
    assert best_tree(counts, 5, 1) == ((0,), (1,), (2,), (3,), (4,))  # depth 1 only; (3,) and (4,) never matched
    # Fewer matched paths than nodes: filled up with unmatched children of the lowest rank sum, prefix-closed.
    assert best_tree(Counter({(0,): 3}), 4, 2) == ((0,), (1,), (0, 0), (0, 1))
    assert best_tree(Counter(), 3, 3) == ((0,), (0, 0), (0, 0, 0))


def test_tree_geometry_and_acceptance():
    """Row 0: 2 pending tokens then nodes a(root child), b(child of a), c(root child), d(child of c); row 1: a chain.
    Each node sits one rotary position after its parent and sees the cache, the pending tokens and its ancestors."""
    lm = tiny_lm(num_heads=3)
    cache = lm.new_cache(2, 32, torch.tensor([3, 4]))
    cache.lengths[:] = torch.tensor([3, 5])
    trees = [DraftTree.from_paths([([7, 8], [2, 3]), ([9, 10], [2, 3])]), DraftTree.from_paths([([7, 8], [2, 3])])]
    n_pending = torch.tensor([2, 1])
    batch = TreeBatch(trees, n_pending, width=6)
    g = cache.call_geometry(6, batch.offsets, batch.visible)
    assert g.positions[0].tolist() == [3, 4, 5, 6, 5, 6]  # pending 3, 4; a, b; c, d
    assert g.positions[1].tolist() == [5, 6, 7, 5, 5, 5]  # pending, two chain nodes, padding (at the root's)
    mask = g.mask[0, 0].int()
    # keys: cache slots 0..2, then the block at 3..8 (pending p0 p1, nodes a b c d)
    assert mask[:, :3].all()
    assert mask[:, 3:9].tolist() == [
        [1, 0, 0, 0, 0, 0],  # p0
        [1, 1, 0, 0, 0, 0],  # p1
        [1, 1, 1, 0, 0, 0],  # a
        [1, 1, 1, 1, 0, 0],  # b
        [1, 1, 0, 0, 1, 0],  # c
        [1, 1, 0, 0, 1, 1],  # d
    ]
    assert torch.equal(g.mask[1, 0], torch.arange(g.span)[None, :] <= (5 + torch.arange(6))[:, None])
    # head 1's argmax at the root and at each node: row 0 rejects a and accepts c then d; row 1 accepts 7 only
    head1 = torch.tensor([[9, 0, 0, 10, 4], [7, 3, 0, 0, 0]])
    accepted, last_col = batch.accept(head1)
    assert accepted.tolist() == [2, 1] and last_col.tolist() == [4, 1]


def test_cache_move():
    lm = tiny_lm(num_heads=3)
    cache = lm.new_cache(3, 16, torch.tensor([1, 1, 1]))
    cache.k.normal_()
    cache.v.normal_()
    k, v = cache.k.clone(), cache.v.clone()
    cache.move(torch.tensor([0, 2]), torch.tensor([[7, 9], [5, 5]]), torch.tensor([[4, 5], [3, 3]]))
    assert torch.equal(cache.k[:, 0, :, 4], k[:, 0, :, 7]) and torch.equal(cache.k[:, 0, :, 5], k[:, 0, :, 9])
    assert torch.equal(cache.v[:, 2, :, 3], v[:, 2, :, 5])
    assert torch.equal(cache.k[:, 1], k[:, 1])  # an unlisted row is untouched
    changed = (cache.k != k).any(dim=(0, 2, 4)).nonzero().tolist()
    assert changed == [[0, 4], [0, 5], [2, 3]]


def decode(lm, prefix, lens, limits, method, **kw):
    return generate(lm, prefix, lens, method, max_new_tokens=limits, **kw)


def tokens(out):
    return [h.tokens for h in out.hyps]


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("rate", [0.0, 1.7], ids=["consecutive", "aligned"])
def test_tree_verify_equals_greedy_and_batching(kind, rate):
    lm = tiny_lm(kind, num_heads=3, seed=60 + HEAD_KINDS.index(kind), prefix_rate=rate)
    chain_calls = tree_calls = 0
    for seed in range(3):
        prefix, lens, limits = random_batch(lm, 40, 600 + seed)
        greedy = decode(lm, prefix, lens, limits, "greedy")
        chain = decode(lm, prefix, lens, limits, "mtp-verify")
        tree = decode(lm, prefix, lens, limits, "mtp-verify", draft_tree=(3, 2))
        assert tokens(tree) == tokens(greedy)
        assert [h.finished for h in tree.hyps] == [h.finished for h in greedy.hyps]
        assert sum(tree.accepted_per_head) == sum(len(t) for t in tokens(greedy))
        chain_calls += sum(h.decoder_calls for h in chain.hyps)
        tree_calls += sum(h.decoder_calls for h in tree.hyps)
        for r in range(0, 40, 7):  # batch size 1 gives the same tokens and calls
            n = int(lens[r])
            alone = decode(lm, prefix[r:r + 1, :n], lens[r:r + 1], limits[r:r + 1], "mtp-verify", draft_tree=(3, 2))
            assert (alone.hyps[0].tokens, alone.hyps[0].decoder_calls) == (tree.hyps[r].tokens,
                                                                          tree.hyps[r].decoder_calls)
    assert tree_calls < chain_calls


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("widths", [(2, 2), (3, 1), "0;1;3;0.0;0.2;3.0"])
def test_tree_matches_cache_free_reference(kind, widths):
    """Tokens and calls equal those of verifying every path as its own chain with a full forward pass: the tree mask,
    its rotary positions and the move of the accepted path in the cache are exact."""
    lm = tiny_lm(kind, num_heads=3, seed=70 + HEAD_KINDS.index(kind), prefix_rate=1.3)
    prefix, lens, limits = random_batch(lm, 12, 700)
    out = decode(lm, prefix, lens, limits, "mtp-verify", draft_tree=widths)
    for r, hyp in enumerate(out.hyps):
        want = reference_decode(lm, prefix[r, : lens[r]], "mtp-verify", 3, 0, int(limits[r]), tree=widths)
        assert (hyp.tokens, hyp.decoder_calls, hyp.finished) == want, f"row {r}"


def test_ctc_verify_with_a_head_tree_equals_greedy():
    """CTC drafts and the heads' tree are sibling branches of one tree; noisy drafts still give greedy's output."""
    lm = tiny_lm("latent", num_heads=3, seed=80)
    prefix, lens, limits = random_batch(lm, 30, 800)
    greedy = decode(lm, prefix, lens, limits, "greedy")
    g = torch.Generator().manual_seed(0)
    drafts = []
    for t in tokens(greedy):  # greedy's output with about a third of the tokens replaced
        noisy = [x if torch.rand(1, generator=g) > 0.3 else int(torch.randint(3, 16, (1,), generator=g)) for x in t]
        drafts.append(noisy)
    for widths in [(), (2, 2), "0;1;0.0;1.0;0.1"]:
        out = decode(lm, prefix, lens, limits, "ctc-verify", drafts=drafts, max_draft=4, draft_tree=widths)
        assert tokens(out) == tokens(greedy)
        assert out.accepted_external > 0


@pytest.mark.parametrize("widths", [(), (4, 4)])
def test_verification_up_to_the_decoder_length_limit(widths):
    """Rows that run to the last positions the decoder has (max_seq_len 256), batched with a row that stops early and
    with CTC drafts longer than what is left: drafts stop at the row's limit and padding stays inside the rotary
    table (this raised an IndexError before), and the output is still greedy's."""
    lm = tiny_lm("latent", num_heads=3, seed=5)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randn(2, 200, 16, generator=g, dtype=torch.float64)
    lens, limits = torch.tensor([200, 170]), torch.tensor([48, 48])  # 200 + 48 = 256 - 2K - 2
    greedy = decode(lm, prefix, lens, limits, "greedy")
    assert len(greedy.hyps[0].tokens) == 48 and greedy.hyps[1].finished
    drafts = [torch.randint(3, 16, (60,), generator=g).tolist(), [5, 6, 7]]
    out = decode(lm, prefix, lens, limits, "ctc-verify", drafts=drafts, max_draft=32, draft_tree=widths)
    assert tokens(out) == tokens(greedy)
    assert tokens(decode(lm, prefix, lens, limits, "mtp-verify", draft_tree=widths)) == tokens(greedy)


def test_tree_argument_errors():
    lm = tiny_lm(num_heads=3)
    prefix, lens, _ = random_batch(lm, 2, 0)
    with pytest.raises(ValueError, match="reaches depth 3, but heads 2..3 draft only 2 tokens"):
        generate(lm, prefix, lens, "mtp-verify", draft_tree=(2, 2, 2))
    with pytest.raises(ValueError, match="reaches depth 2, but heads 2..2"):
        generate(lm, prefix, lens, "mtp-verify", num_heads=2, draft_tree="0;0.0")
    with pytest.raises(ValueError, match=">= 1"):
        generate(lm, prefix, lens, "mtp-verify", draft_tree=(2, 0))
    with pytest.raises(ValueError, match="lacks its parent"):
        generate(lm, prefix, lens, "mtp-verify", draft_tree=((0,), (1, 1)))
