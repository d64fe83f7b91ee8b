"""The CTC head's transcript: the prefix beam search against brute force (every label sequence, and every sequence of
lexicon words), its lexicon constraint under a narrow beam, and best path for a beam of 1."""
import itertools

import pytest
import torch

from mtp_asr.decode.ctc_search import ctc_greedy, ctc_prefix_beam_search, ctc_transcripts
from mtp_asr.decode.lexicon import DEAD, Lexicon
from mtp_asr.decode.rescore import ctc_sequence_log_probs
from test_lexicon import LetterTokenizer

FULL = 10 ** 6  # a beam that never prunes


def peaky_log_probs(T: int, V: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(T, V + 1, generator=g), -1)


@pytest.mark.parametrize("seed", range(6))
def test_a_full_beam_finds_the_most_probable_label_sequence(seed):
    T, V = 5, 3  # labels 0..2, blank 3: every sequence of up to T labels is enumerated
    log_probs = peaky_log_probs(T, V, seed)
    seqs = [list(s) for n in range(T + 1) for s in itertools.product(range(V), repeat=n)]
    scores = ctc_sequence_log_probs(log_probs.double(), seqs, V)
    best = seqs[int(scores.argmax())]
    assert ctc_prefix_beam_search(log_probs.numpy(), V, FULL, token_prune=float("inf")) == best


@pytest.mark.parametrize("seed", range(6))
def test_a_full_beam_with_a_lexicon_finds_the_most_probable_word_sequence(seed):
    tokenizer = LetterTokenizer()
    words = ["a", "ab", "bad", "cab", "dab"]
    lexicon = Lexicon(words, tokenizer)
    T, V = 9, tokenizer.vocab_size  # blank V
    # Posteriors that favour the boundary mark and the letters a..d, so that real words compete.
    log_probs = peaky_log_probs(T, V, seed, scale=2.0)
    log_probs[:, [3, 4, 5, 6, 7, V]] += 3.0
    log_probs = torch.log_softmax(log_probs, -1)
    seqs = [[]] + [tokenizer.encode(" ".join(ws)) for n in range(1, 5) for ws in itertools.product(words, repeat=n)]
    scores = ctc_sequence_log_probs(log_probs.double(), seqs, V)
    assert scores.max() > -float("inf")
    best = seqs[int(scores.argmax())]
    found = ctc_prefix_beam_search(log_probs.numpy(), V, FULL, lexicon, token_prune=float("inf"))
    assert found == best
    # Without the lexicon the best label sequence is not made of its words here: the constraint did the work.
    free = ctc_prefix_beam_search(log_probs.numpy(), V, 64)
    assert free != best


@pytest.mark.parametrize("beam", [1, 2, 4])
def test_a_narrow_beam_still_emits_lexicon_words_only(beam):
    tokenizer = LetterTokenizer()
    lexicon = Lexicon(["bad", "cab", "dice", "fig", "lake", "hide"], tokenizer)
    for seed in range(8):
        log_probs = peaky_log_probs(20, tokenizer.vocab_size, seed)
        tokens = ctc_prefix_beam_search(log_probs.numpy(), tokenizer.vocab_size, beam, lexicon)
        state = lexicon.advance(lexicon.start, tokens)
        assert state != DEAD and (lexicon.final[state] or state == lexicon.start), tokens


def test_a_beam_of_one_without_a_lexicon_is_best_path():
    log_probs = torch.stack([peaky_log_probs(12, 5, seed) for seed in range(3)])
    lens = torch.tensor([12, 7, 10])
    assert ctc_transcripts(log_probs, lens, 5, beam=1) == ctc_greedy(log_probs, lens, 5)
    # A wider beam reads only each row's valid frames too.
    wide = ctc_transcripts(log_probs, lens, 5, beam=4)
    assert wide[1] == ctc_prefix_beam_search(log_probs[1, :7].numpy(), 5, 4)
    with pytest.raises(ValueError, match="CTC beam must be >= 1"):
        ctc_prefix_beam_search(log_probs[0].numpy(), 5, 0)
