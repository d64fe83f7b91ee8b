"""The batched decoding loop: `mtp-verify` is lossless, batching changes nothing, call counts match the definitions
(worked out by hand on a model whose predictions are set by construction), and drafts really save calls."""
import pytest
import torch

from model_fixtures import (  # noqa: F401
    EOS, counting_firsts, counting_task, random_batch, random_prompts, reference_decode, single_thread, tiny_lm,
    trained_counting_lm,
)
from mtp_asr.decode.generate import generate
from mtp_asr.model.heads import HEAD_KINDS


def decode(lm, prefix, lens, limits, method, **kw):
    return generate(lm, prefix, lens, method, max_new_tokens=limits, **kw)


def decode_alone(lm, prefix, lens, limits, method, **kw):
    """Each row on its own, trimmed to its own prompt length."""
    hyps = []
    for r in range(prefix.shape[0]):
        n = int(lens[r])
        hyps += decode(lm, prefix[r:r + 1, :n], lens[r:r + 1], limits[r:r + 1], method, **kw).hyps
    return hyps


def tokens(out_or_hyps):
    hyps = out_or_hyps.hyps if hasattr(out_or_hyps, "hyps") else out_or_hyps
    return [h.tokens for h in hyps]


def calls(out_or_hyps):
    hyps = out_or_hyps.hyps if hasattr(out_or_hyps, "hyps") else out_or_hyps
    return [h.decoder_calls for h in hyps]


# ---- a model whose every prediction is set by hand -------------------------------------------------------------
#
# One layer whose attention and MLP outputs are zero, so the trunk state at a position is its input embedding; the
# embeddings are one-hot, so every head's prediction depends only on the current token, through a table:
#   head 1 (the LM head): 3 -> 4 -> 5 -> ... -> 12 -> EOS, and EOS, 0, 1, 13, 14, 15 -> 3;
#   head 2: the token two ahead, except head2(6) = 3 (wrong);  head 3: three ahead, except head3(7) = 5 (wrong);
#   confidence (softmax probability about 1, or about 0.1): head 2 unsure at 4, head 3 unsure at 3 and 6;
#   head 2's second choice at 6 is the right token, 8 (every other second choice is an arbitrary wrong token).

V = 16


def chain(t, steps):
    for _ in range(steps):
        t = t + 1 if 3 <= t <= 11 else (EOS if t == 12 else 3)
    return t


HEAD2 = {t: chain(t, 2) for t in range(V)} | {6: 3}
HEAD3 = {t: chain(t, 3) for t in range(V)} | {7: 5}
UNSURE = {2: {4}, 3: {3, 6}}


@torch.no_grad()
def hand_built_model():
    lm = tiny_lm("linear", num_heads=3, vocab=V, dim=V, n_layers=1, n_heads=1, n_kv_heads=None, randomize=False)
    dec = lm.decoder
    dec.embed_tokens.weight.copy_(torch.eye(V))
    dec.layers[0].self_attn.o_proj.weight.zero_()
    dec.layers[0].mlp.down_proj.weight.zero_()
    tables = [(dec.lm_head, {t: chain(t, 1) for t in range(V)}, set()),
              (lm.heads.proj[0], HEAD2, UNSURE[2]), (lm.heads.proj[1], HEAD3, UNSURE[3])]
    for layer, table, unsure in tables:
        layer.weight.zero_()
        for t, nxt in table.items():
            layer.weight[nxt, t] = 0.1 if t in unsure else 10.0  # logits: 4 * weight (RMSNorm of a one-hot is 4)
    lm.heads.proj[0].weight[8, 6] = 5.0
    return lm


def hand_prompts(lm, *prompts):
    """Right-padded embeddings of token prompts (padding: token 0)."""
    width = max(len(p) for p in prompts)
    toks = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    return lm.embed(toks), torch.tensor([len(p) for p in prompts])


def test_hand_built_model_predicts_its_tables():
    lm = hand_built_model()
    prefix, lens = hand_prompts(lm, [1, 3])
    out = generate(lm, prefix, lens, "greedy", max_new_tokens=50)
    assert out.hyps[0].tokens == [4, 5, 6, 7, 8, 9, 10, 11, 12] and out.hyps[0].finished


def test_hand_counted_greedy():
    lm = hand_built_model()
    prefix, lens = hand_prompts(lm, [1, 3], [1, 0, 0, 8])
    out = generate(lm, prefix, lens, "greedy", max_new_tokens=50)
    # one token per call; the call that emits EOS counts
    assert tokens(out) == [[4, 5, 6, 7, 8, 9, 10, 11, 12], [9, 10, 11, 12]]
    assert calls(out) == [10, 5] and out.batch_calls == 10
    assert [h.finished for h in out.hyps] == [True, True]
    assert out.accepted_per_head == [13]

    out = generate(lm, prefix, lens, "greedy", max_new_tokens=torch.tensor([6, 2]))
    assert tokens(out) == [[4, 5, 6, 7, 8, 9], [9, 10]]
    assert calls(out) == [6, 2] and out.batch_calls == 6
    assert [h.finished for h in out.hyps] == [False, False]


def test_hand_counted_verify():
    lm = hand_built_model()
    prefix, lens = hand_prompts(lm, [1, 3], [1, 0, 0, 8])
    out = generate(lm, prefix, lens, "mtp-verify", max_new_tokens=50)
    # Row 0 (block fed -> head 1 at each position -> accepted drafts, correction; drafts for the next call):
    #  1 prefill ...3        -> 4                           emit 4            drafts 5 6
    #  2 [4 5 6]  -> 5 6 7   -> both accepted, 7            emit 5 6 7        at 6: drafts 3 (wrong) 9
    #  3 [7 3 9]  -> 8 ..    -> 3 rejected, 8               emit 8            at 7: drafts 9 5 (wrong)
    #  4 [8 9 5]  -> 9 10 .. -> 9 accepted, 5 rejected, 10  emit 9 10         at 9: drafts 11 12
    #  5 [10 11 12] -> 11 12 EOS -> both accepted, EOS      emit 11 12, end
    # Row 1: 1 prefill ...8 -> 9, drafts 10 11;  2 [9 10 11] -> 10 11 12: emit 10 11 12, at 11: drafts EOS 3;
    #  3 [12 EOS 3] -> EOS 3 4: EOS is an accepted draft: end.
    assert tokens(out) == [[4, 5, 6, 7, 8, 9, 10, 11, 12], [9, 10, 11, 12]]
    assert calls(out) == [5, 3] and out.batch_calls == 5
    assert [h.finished for h in out.hyps] == [True, True]
    # head 1: 4 7 8 10 | 9 12; head 2: 5 9 11 | 10; head 3: 6 12 | 11
    assert out.accepted_per_head == [6, 4, 3]

    out = generate(lm, prefix, lens, "mtp-verify", max_new_tokens=torch.tensor([6, 2]))
    # row 0 stops inside call 4 after 9; row 1 inside call 2 after 10
    assert tokens(out) == [[4, 5, 6, 7, 8, 9], [9, 10]]
    assert calls(out) == [4, 2] and out.batch_calls == 4
    assert [h.finished for h in out.hyps] == [False, False]

    # two of the three heads: head 2 drafts one token per call; it is wrong only at 6, which never ends a block
    out = generate(lm, prefix[:1], lens[:1], "mtp-verify", num_heads=2, max_new_tokens=50)
    # calls: prefill (4), [4 5] (5 6), [6 7] (7 8), [8 9] (9 10), [10 11] (11 12), [12 EOS] (EOS accepted)
    assert tokens(out) == [[4, 5, 6, 7, 8, 9, 10, 11, 12]] and calls(out) == [6]


def test_hand_counted_tree_verify():
    lm = hand_built_model()
    prefix, lens = hand_prompts(lm, [1, 3], [1, 0, 0, 8])
    out = generate(lm, prefix, lens, "mtp-verify", max_new_tokens=50, draft_tree=(2, 2))
    # As in the chain above until call 3, where the tree also holds head 2's second choice at 6, which is right:
    #  3 [7 | 3 8 x 9 y]: 3 rejected, 8 accepted, 9 (its child) accepted, correction 10   emit 8 9 10
    #  4 [10 | 11 12 ..]: both accepted, then EOS                                            emit 11 12, end
    # Row 1 takes 3 calls as before.
    assert tokens(out) == [[4, 5, 6, 7, 8, 9, 10, 11, 12], [9, 10, 11, 12]]
    assert calls(out) == [4, 3] and out.batch_calls == 4
    # head 1: 4 7 10 | 9 12; head 2: 5 8 11 | 10; head 3: 6 9 12 | 11
    assert out.accepted_per_head == [5, 4, 4]
    assert reference_decode(lm, prefix[0, :2], "mtp-verify", 3, 0, 50, tree=(2, 2)) == (tokens(out)[0], 4, True)


def test_hand_counted_threshold():
    lm = hand_built_model()
    prefix, lens = hand_prompts(lm, [1, 3], [6])
    out = generate(lm, prefix, lens, "mtp-threshold", threshold=0.5, max_new_tokens=50)
    # Row 0: at 3: 4, head2 5 (sure), head3 unsure -> 4 5;  at 5: 6 7 8;  at 8: 9 10 11;  at 11: 12 EOS.
    # Row 1 (lossy: head 2 is sure and wrong at 6): at 6: 7 3 (head 3 unsure);  at 3: 4 5;  at 5: 6 7 8;
    #  at 8: 9 10 11;  at 11: 12 EOS.
    assert tokens(out) == [[4, 5, 6, 7, 8, 9, 10, 11, 12], [7, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
    assert calls(out) == [4, 5] and out.batch_calls == 5
    assert [h.finished for h in out.hyps] == [True, True]
    # head 1: 4 6 9 12 | 7 4 6 9 12; head 2: 5 7 10 | 3 5 7 10; head 3: 8 11 | 8 11
    assert out.accepted_per_head == [9, 7, 4]

    out = generate(lm, prefix, lens, "mtp-threshold", threshold=0.5, max_new_tokens=torch.tensor([5, 3]))
    assert tokens(out) == [[4, 5, 6, 7, 8], [7, 3, 4]] and calls(out) == [2, 2]

    # tau = 0 takes every head: K tokens per call. Row 0: at 3: 4 5 6;  at 6: 7 3 9;  at 9: 10 11 12;  at 12: EOS.
    out = generate(lm, prefix[:1], lens[:1], "mtp-threshold", threshold=0.0, max_new_tokens=50)
    assert tokens(out) == [[4, 5, 6, 7, 3, 9, 10, 11, 12]] and calls(out) == [4]
    # tau > 1 takes none: greedy
    out = generate(lm, prefix, lens, "mtp-threshold", threshold=1.01, max_new_tokens=50)
    assert tokens(out) == [[4, 5, 6, 7, 8, 9, 10, 11, 12], [7, 8, 9, 10, 11, 12]] and calls(out) == [10, 7]


def test_hand_built_model_agrees_with_the_reference_decoder():
    """The cache-free reference decoder used below gets the hand counts too (so it is a fair judge)."""
    lm = hand_built_model()
    prefix, lens = hand_prompts(lm, [1, 3])
    assert reference_decode(lm, prefix[0], "mtp-verify", 3, 0, 50) == ([4, 5, 6, 7, 8, 9, 10, 11, 12], 5, True)
    assert reference_decode(lm, prefix[0], "mtp-threshold", 3, 0.5, 50)[1:] == (4, True)
    assert reference_decode(lm, prefix[0], "greedy", 3, 0, 6) == ([4, 5, 6, 7, 8, 9], 6, False)


# ---- random models ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_verify_equals_greedy_on_random_models(kind):
    lm = tiny_lm(kind, num_heads=4, seed=HEAD_KINDS.index(kind))
    n_finished = greedy_calls = verify_calls = 0
    for seed in range(4):  # 200 utterances, batches of 50
        prefix, lens, limits = random_batch(lm, 50, seed)
        greedy = decode(lm, prefix, lens, limits, "greedy")
        verify = decode(lm, prefix, lens, limits, "mtp-verify")
        assert tokens(verify) == tokens(greedy)
        assert [h.finished for h in verify.hyps] == [h.finished for h in greedy.hyps]
        assert sum(verify.accepted_per_head) == sum(len(t) for t in tokens(greedy))
        n_finished += sum(h.finished for h in greedy.hyps)
        greedy_calls += sum(calls(greedy))
        verify_calls += sum(calls(verify))
    assert 0 < n_finished < 200  # both endings occur: EOS and the length limit
    assert verify_calls <= greedy_calls
    # batch size 1 (greedy's tokens do not depend on batching: test_batched_equals_unbatched), with all the heads
    # and with fewer than the model has
    prefix, lens, limits = random_batch(lm, 80, 100)
    greedy = tokens(decode(lm, prefix, lens, limits, "greedy"))
    assert tokens(decode_alone(lm, prefix[:50], lens[:50], limits[:50], "mtp-verify")) == greedy[:50]
    assert tokens(decode_alone(lm, prefix[50:], lens[50:], limits[50:], "mtp-verify", num_heads=2)) == greedy[50:]


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("method,threshold", [("greedy", 1.0), ("mtp-threshold", 0.3), ("mtp-verify", 1.0)])
@pytest.mark.parametrize("rate", [0.0, 1.7], ids=["consecutive", "aligned"])
def test_batched_equals_unbatched(kind, method, threshold, rate):
    lm = tiny_lm(kind, num_heads=3, seed=10 + HEAD_KINDS.index(kind), prefix_rate=rate)
    prefix, lens, limits = random_batch(lm, 24, 200)
    batched = decode(lm, prefix, lens, limits, method, threshold=threshold)
    alone = decode_alone(lm, prefix, lens, limits, method, threshold=threshold)
    assert tokens(batched) == tokens(alone)
    assert calls(batched) == calls(alone)
    assert [h.finished for h in batched.hyps] == [h.finished for h in alone]
    assert batched.batch_calls == max(calls(alone))


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("method,threshold", [("greedy", 1.0), ("mtp-threshold", 0.3), ("mtp-verify", 1.0)])
@pytest.mark.parametrize("rate", [0.0, 1.7], ids=["consecutive", "aligned"])
def test_matches_cache_free_reference(kind, method, threshold, rate):
    """Tokens and calls equal those of the definitions run with a full forward pass per call (no KV cache), with
    consecutive and with aligned rotary positions for the prompt."""
    lm = tiny_lm(kind, num_heads=3, seed=20 + HEAD_KINDS.index(kind), prefix_rate=rate)
    prefix, lens, limits = random_batch(lm, 12, 300)
    out = decode(lm, prefix, lens, limits, method, threshold=threshold)
    for r, hyp in enumerate(out.hyps):
        want = reference_decode(lm, prefix[r, : lens[r]], method, 3, threshold, int(limits[r]))
        assert (hyp.tokens, hyp.decoder_calls, hyp.finished) == want, f"row {r}"


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_threshold_extremes(kind):
    lm = tiny_lm(kind, num_heads=3, seed=30 + HEAD_KINDS.index(kind))
    prefix, lens, limits = random_batch(lm, 40, 400)
    greedy = decode(lm, prefix, lens, limits, "greedy")
    never = decode(lm, prefix, lens, limits, "mtp-threshold", threshold=1.01)
    assert tokens(never) == tokens(greedy) and calls(never) == calls(greedy)
    always = decode(lm, prefix, lens, limits, "mtp-threshold", threshold=0.0)
    for h, limit in zip(always.hyps, limits.tolist()):
        # K tokens per call; EOS is emitted too (it ends the call it is in), the length limit stops at `limit`
        emitted = len(h.tokens) + 1 if h.finished else limit
        assert h.decoder_calls == -(-emitted // 3), h
        assert h.finished or len(h.tokens) == limit
    assert sum(always.accepted_per_head) == sum(len(h.tokens) for h in always.hyps)


@pytest.mark.parametrize("method", ["greedy", "mtp-threshold", "mtp-verify"])
def test_zero_length_limit_emits_nothing(method):
    """max_new_tokens is a limit on emitted tokens: a row allowed 0 gets none (or the call is refused clearly)."""
    lm = tiny_lm(num_heads=3)
    prefix, lens, _ = random_batch(lm, 2, 0)
    try:
        out = generate(lm, prefix, lens, method, threshold=0.0, max_new_tokens=torch.tensor([0, 3]))
    except ValueError as e:
        assert "max_new_tokens" in str(e)
        return
    assert out.hyps[0].tokens == []
    assert len(out.hyps[1].tokens) <= 3


def test_argument_errors():
    lm = tiny_lm(num_heads=2)
    prefix, lens, _ = random_batch(lm, 2, 0)
    with pytest.raises(ValueError, match="unknown decoding method"):
        generate(lm, prefix, lens, "beam-of-light")
    with pytest.raises(ValueError, match="--num-heads must be in 1..2"):
        generate(lm, prefix, lens, "mtp-verify", num_heads=3)
    with pytest.raises(ValueError, match="threshold"):
        generate(lm, prefix, lens, "mtp-threshold", threshold=-0.1)


# ---- a briefly trained model: heads that agree, drafts that get accepted ---------------------------------------

@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_verify_equals_greedy_on_a_trained_model(kind):
    lm, prefix, lens = trained_counting_lm(kind, rows=200)  # prompt: [BOS] c; the model continues c+1 ...
    with torch.no_grad():
        out = lm(counting_task(range(3, 24)))
    accuracy = (out.head_correct / out.head_count).tolist()
    firsts = counting_firsts(200)
    limits = torch.full((200,), 15)
    greedy = decode(lm, prefix, lens, limits, "greedy")
    verify = decode(lm, prefix, lens, limits, "mtp-verify")
    assert tokens(verify) == tokens(greedy)
    assert tokens(decode_alone(lm, prefix[:20], lens[:20], limits[:20], "mtp-verify")) == tokens(greedy)[:20]
    right = sum(t == c[1:] for t, c in zip(tokens(greedy), counting_task(firsts.tolist())))
    g_calls, v_calls = sum(calls(greedy)), sum(calls(verify))
    print(f"{kind}: head accuracy {[round(a, 2) for a in accuracy]}, greedy right {right}/200, "
          f"calls greedy {g_calls} verify {v_calls} ({g_calls / v_calls:.2f}x), per head {verify.accepted_per_head}")
    assert verify.accepted_per_head[1] > 0 and v_calls < g_calls


# ---- measured, not asserted: how often float32 rounding makes mtp-verify differ from greedy ---------------------

def test_float32_verify_mismatch_rate():
    mismatched = total = 0
    for i, kind in enumerate(HEAD_KINDS):
        lm = tiny_lm(kind, num_heads=4, seed=50 + i, dtype=torch.float32)
        for seed in range(2):
            prefix, lens, limits = random_batch(lm, 50, 500 + seed)
            greedy = decode(lm, prefix, lens, limits, "greedy")
            verify = decode(lm, prefix, lens, limits, "mtp-verify")
            mismatched += sum(a != b for a, b in zip(tokens(greedy), tokens(verify)))
            total += 50
    print(f"float32: mtp-verify differs from greedy on {mismatched}/{total} utterances ({mismatched / total:.2%})")
