"""TextBatches (text for LM pre-training): token limit, DDP shares across ranks, and skip for exact resume."""
import random

import pytest

from mtp_asr.data.dataset import TextBatches

MAX_TOKENS = 64


def sentences(n: int, seed: int = 0, longest: int = 30) -> list:
    """n token sequences of random lengths 1..longest; sentence i starts with token i, so a batch names its lines."""
    rng = random.Random(seed)
    return [[i] + [rng.randrange(1000, 2000) for _ in range(rng.randint(0, longest - 1))] for i in range(n)]


def line_ids(batches) -> list:
    return [s[0] for batch in batches for s in batch]


def test_every_line_once_within_the_token_limit_reshuffled_each_epoch():
    seqs = sentences(300) + [[300] + [7] * 80]  # one line longer than max_tokens on its own: a batch of one
    batches = list(TextBatches(seqs, MAX_TOKENS, seed=3).epoch(0))
    assert sorted(line_ids(batches)) == list(range(len(seqs)))
    for batch in batches:
        assert all(s == seqs[s[0]] for s in batch)  # the sentences themselves, unchanged
        padded = max(len(s) + 2 for s in batch) * len(batch)  # BOS and EOS count
        assert padded <= MAX_TOKENS or len(batch) == 1
    assert [[300] + [7] * 80] in batches
    assert len(batches) < len(seqs) / 2  # short sentences share batches
    # The order follows (seed, epoch): the same again, another for the next epoch or another seed.
    assert list(TextBatches(seqs, MAX_TOKENS, seed=3).epoch(0)) == batches
    assert line_ids(TextBatches(seqs, MAX_TOKENS, seed=3).epoch(1)) != line_ids(batches)
    assert line_ids(TextBatches(seqs, MAX_TOKENS, seed=4).epoch(0)) != line_ids(batches)


def test_batch_count_of_equal_length_sentences():
    # 14 tokens + BOS/EOS = 16 per line, so 4 lines fill 64 tokens; the lines are batched within pools of
    # 64 * (64 // 32) = 128 lines: 130 lines -> 32 full batches of the first pool, one of 2 lines of the second.
    seqs = [[i] + [5] * 13 for i in range(130)]
    batches = list(TextBatches(seqs, MAX_TOKENS).epoch(0))
    assert sorted(len(b) for b in batches) == [2] + [4] * 32


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_take_disjoint_equal_shares(world_size):
    seqs = sentences(300, seed=1)
    for epoch in range(3):
        full = list(TextBatches(seqs, MAX_TOKENS, seed=5).epoch(epoch))
        shares = [list(TextBatches(seqs, MAX_TOKENS, seed=5, rank=r, world_size=world_size).epoch(epoch))
                  for r in range(world_size)]
        per_rank = len(full) // world_size
        # Equal numbers of batches on every rank (DDP steps together), rank r taking every world_size-th batch.
        assert [len(share) for share in shares] == [per_rank] * world_size and per_rank > 10
        for r, share in enumerate(shares):
            assert share == full[r::world_size][:per_rank]
        # Disjoint, and together every line except those of the < world_size leftover batches at the end.
        ids = [i for share in shares for i in line_ids(share)]
        assert len(ids) == len(set(ids))
        kept = full[:per_rank * world_size]
        assert sorted(ids) == sorted(line_ids(kept))
        dropped = set(range(len(seqs))) - set(ids)
        assert dropped == set(line_ids(full[per_rank * world_size:])) and len(full) - len(kept) < world_size


def test_ranks_drop_the_leftover_batch():
    # 33 batches (see test_batch_count_of_equal_length_sentences) over 2 ranks: 16 each, one batch left out.
    seqs = [[i] + [5] * 13 for i in range(130)]
    shares = [list(TextBatches(seqs, MAX_TOKENS, rank=r, world_size=2).epoch(0)) for r in range(2)]
    assert [len(s) for s in shares] == [16, 16]
    ids = line_ids(shares[0]) + line_ids(shares[1])
    assert len(set(ids)) == len(ids) and len(seqs) - len(ids) in (2, 4)  # the left-out batch's lines
    # More ranks than batches: every rank gets none (rather than some ranks one, which would stall DDP).
    assert [list(TextBatches(seqs[:4], MAX_TOKENS, rank=r, world_size=2).epoch(0)) for r in range(2)] == [[], []]


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 3)])
def test_skip_resumes_the_uninterrupted_order(rank, world_size):
    seqs = sentences(300, seed=2)
    full = list(TextBatches(seqs, MAX_TOKENS, seed=7, rank=rank, world_size=world_size).epoch(2))
    n = len(full)
    for skip in (0, 1, 5, n - 1, n, n + 3):
        # A new object, as after a restart: the epoch's order is rebuilt from the seed and the first `skip` left out.
        resumed = TextBatches(seqs, MAX_TOKENS, seed=7, rank=rank, world_size=world_size).epoch(2, skip=skip)
        assert list(resumed) == full[skip:], skip
    # Interrupted after k batches and resumed: together exactly the uninterrupted epoch, each batch once.
    k = n // 2
    first = TextBatches(seqs, MAX_TOKENS, seed=7, rank=rank, world_size=world_size).epoch(2)
    before = [next(first) for _ in range(k)]
    after = list(TextBatches(seqs, MAX_TOKENS, seed=7, rank=rank, world_size=world_size).epoch(2, skip=k))
    assert before + after == full


def test_no_text_is_an_error():
    with pytest.raises(ValueError, match="no text"):
        TextBatches([], MAX_TOKENS)
