"""ctc-verify: external (CTC) drafts verified by the decoder; output identical to greedy, calls as designed."""
import sys
from pathlib import Path

import pytest
import torch

from mtp_asr.decode.ctc_search import ctc_greedy
from mtp_asr.decode.drafts import DraftAligner, retokenize
from mtp_asr.decode.generate import generate

sys.path.insert(0, str(Path(__file__).parent))
from model_fixtures import random_prompts, tiny_lm, trained_counting_lm  # noqa: E402


def greedy_tokens(lm, prefix, lens, limit=20):
    return [h.tokens for h in generate(lm, prefix, lens, "greedy", max_new_tokens=limit).hyps]


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    blank = 4
    frames = torch.tensor([[4, 1, 1, 4, 1, 2, 2, 4, 4, 3, 0]])
    log_probs = torch.nn.functional.one_hot(frames, 5).float().log()
    assert ctc_greedy(log_probs, torch.tensor([10]), blank) == [[1, 1, 2, 3]]  # the last frame is padding


@pytest.mark.parametrize("emitted, expected", [
    ([5, 6], [7, 8, 9]),  # all correct so far
    ([5, 6, 1], [8, 9]),  # substitution: 1 instead of 7 -> go on after 7
    ([5, 6, 8], [9]),  # the draft had an extra 7 -> go on after 8
    ([5, 6, 1, 7], [8, 9]),  # the draft missed 1 -> resume at 7's successor
])
def test_aligner_resumes_after_each_kind_of_error(emitted, expected):
    aligner = DraftAligner([5, 6, 7, 8, 9])
    aligner.advance(emitted)
    assert aligner.continuations(10, 1) == [expected]


def test_aligner_offers_each_equally_good_reading_after_a_correction():
    aligner = DraftAligner([5, 6, 7, 8, 9])
    aligner.advance([5, 6, 1])  # 1 replaced 7, or 1 is a token the draft missed before 7
    assert aligner.continuations(10, 3) == [[8, 9], [7, 8, 9]]  # the substitution first, as with one branch
    assert aligner.continuations(1, 3) == [[8], [7]]


def test_retokenize_uses_the_tokenizer():
    class Chars:
        def encode(self, text):
            return [ord(c) for c in text]

    assert retokenize(["ab"], Chars()) == [[97, 98]]


@pytest.mark.parametrize("kind", ["latent", "linear", "medusa", "layer"])
@pytest.mark.parametrize("rate", [0.0, 1.7], ids=["consecutive", "aligned"])
def test_identical_to_greedy_with_random_drafts(kind, rate):
    g = torch.Generator().manual_seed(1)
    lm = tiny_lm(kind=kind, num_heads=3, vocab=16, prefix_rate=rate)
    prefix, lens = random_prompts(lm, 12, 6, g)
    ref = greedy_tokens(lm, prefix, lens)
    drafts = [torch.randint(0, 16, (int(torch.randint(0, 25, (), generator=g)),), generator=g).tolist()
              for _ in range(12)]
    for max_draft, branches in ((1, 1), (32, 1), (4, 3)):
        out = generate(lm, prefix, lens, "ctc-verify", drafts=drafts, max_new_tokens=20, max_draft=max_draft,
                       draft_branches=branches)
        assert [h.tokens for h in out.hyps] == ref
        single = [generate(lm, prefix[i:i + 1], lens[i:i + 1], "ctc-verify", drafts=drafts[i:i + 1],
                           max_new_tokens=20, max_draft=max_draft, draft_branches=branches).hyps[0]
                  for i in range(12)]
        assert [h.tokens for h in single] == ref
        assert [h.decoder_calls for h in single] == [h.decoder_calls for h in out.hyps]


def test_identical_to_greedy_with_noisy_drafts_of_a_trained_model():
    """Drafts close to the answer (as a CTC head gives): many accepted, never a different output."""
    lm, prefix, lens = trained_counting_lm()
    ref = greedy_tokens(lm, prefix, lens, 30)
    g = torch.Generator().manual_seed(3)
    noisy = []
    for seq in ref:
        seq = list(seq)
        if len(seq) > 2 and torch.rand((), generator=g) < 0.7:
            seq[int(torch.randint(0, len(seq), (), generator=g))] = int(torch.randint(0, lm.decoder.cfg.vocab_size,
                                                                                        (), generator=g))
        noisy.append(seq)
    out = generate(lm, prefix, lens, "ctc-verify", drafts=noisy, max_new_tokens=30)
    assert [h.tokens for h in out.hyps] == ref
    # One call per utterance when its draft is right, one more per wrong token (two where a repeat confuses the
    # re-alignment), against one per token for greedy.
    n_changed = sum(n != r for n, r in zip(noisy, ref))
    total = sum(h.decoder_calls for h in out.hyps)
    assert len(ref) + n_changed <= total <= len(ref) + 2 * n_changed
    assert total * 3 < sum(len(t) + 1 for t in ref)
    assert out.accepted_external > 0


def _finished_rows(lm, g, n=16, limit=20):
    prefix, lens = random_prompts(lm, n, 6, g)
    ref = generate(lm, prefix, lens, "greedy", max_new_tokens=limit)
    keep = [i for i, h in enumerate(ref.hyps) if h.finished and len(h.tokens) >= 5]
    return prefix[keep], lens[keep], [ref.hyps[i].tokens for i in keep]


def test_perfect_draft_takes_one_call_and_one_wrong_token_one_more():
    g = torch.Generator().manual_seed(2)
    lm = tiny_lm(kind="latent", num_heads=2, vocab=16)
    prefix, lens, ref = _finished_rows(lm, g, n=64)
    assert len(ref) >= 3, "the random model should finish some rows with EOS"
    out = generate(lm, prefix, lens, "ctc-verify", drafts=ref, max_new_tokens=20)
    assert [h.tokens for h in out.hyps] == ref
    assert [h.decoder_calls for h in out.hyps] == [1] * len(ref)  # the prefill verifies the whole draft + EOS

    # One substituted token, away from repeats: an edit-distance alignment cannot tell "a wrong token before x"
    # from "an extra token, then x" when x repeats the corrected token, and resumes one token late there.
    wrong = []
    for seq in ref:
        j = next((j for j in range(1, len(seq) - 1) if len({seq[j - 1], seq[j], seq[j + 1]}) == 3), None)
        if j is None:
            wrong.append(seq)
            continue
        bad = next(t for t in range(3, 16) if t not in seq[j - 1: j + 2])
        wrong.append(seq[:j] + [bad] + seq[j + 1:])
    changed = [w != r for w, r in zip(wrong, ref)]
    assert sum(changed) >= 3
    out = generate(lm, prefix, lens, "ctc-verify", drafts=wrong, max_new_tokens=20)
    assert [h.tokens for h in out.hyps] == ref
    assert [h.decoder_calls for h in out.hyps] == [1 + c for c in changed]


def test_a_missing_draft_token_costs_one_call_with_two_branches_and_two_with_one():
    """The draft lacks one token: after the correction, one branch resumes as if it had been replaced (wrong here,
    one more call), the second as if it had been left out (right: the rest is accepted at once)."""
    g = torch.Generator().manual_seed(2)
    lm = tiny_lm(kind="latent", num_heads=2, vocab=16)
    prefix, lens, ref = _finished_rows(lm, g, n=64)
    # Drop a token that differs from the one before it and the two after it, and they from each other, so that no
    # third reading fits as well.
    keep = [i for i, seq in enumerate(ref) if any(len({*seq[j - 1: j + 3]}) == 4 for j in range(1, len(seq) - 2))]
    assert len(keep) >= 3
    prefix, lens, ref = prefix[keep], lens[keep], [ref[i] for i in keep]
    short = []
    for seq in ref:
        j = next(j for j in range(1, len(seq) - 2) if len({*seq[j - 1: j + 3]}) == 4)
        short.append(seq[:j] + seq[j + 1:])
    for branches, calls in ((1, 3), (2, 2)):
        out = generate(lm, prefix, lens, "ctc-verify", drafts=short, max_new_tokens=20, num_heads=1,
                       draft_branches=branches)
        assert [h.tokens for h in out.hyps] == ref
        assert [h.decoder_calls for h in out.hyps] == [calls] * len(ref), branches
