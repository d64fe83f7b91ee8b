"""Lexicon-constrained decoding: the automaton, every method's output made of lexicon words only, the lossless
methods still identical to (constrained) greedy, the beam-search reductions kept, and the command line."""
import ast
import json

import pytest
import torch
from click.testing import CliRunner

from model_fixtures import EOS, random_batch, single_thread, speech_checkpoint, tiny_lm  # noqa: F401
from mtp_asr.decode.beam import beam_search
from mtp_asr.decode.generate import generate
from mtp_asr.decode.lexicon import DEAD, Lexicon
from mtp_asr.model.heads import HEAD_KINDS

LETTERS = "abcdefghijkl"
SPACE = 3  # the word-boundary token, as a sentencepiece char model has it


class LetterTokenizer:
    """Like a sentencepiece char model over 16 ids: unk 0, bos 1, eos 2, the boundary mark 3, letters 4..15."""

    vocab_size, eos_id = 16, EOS

    def encode(self, text: str) -> list:
        return [t for w in text.lower().split() for t in [SPACE] + [4 + LETTERS.index(c) for c in w]]


WORDS = ["a", "ab", "bad", "cab", "dice", "fig", "lake", "hide", "jab"]


def lexicon() -> Lexicon:
    return Lexicon(WORDS, LetterTokenizer())


def is_words(tokens: list, lex: Lexicon, finished: bool) -> bool:
    """Whether tokens spell lexicon words (the last one possibly cut short when the length limit stopped it)."""
    state = lex.advance(lex.start, tokens)
    return state != DEAD and (not finished or lex.final[state] or state == lex.start)


def test_automaton():
    lex, tok = lexicon(), LetterTokenizer()
    assert lex.allowed(lex.start) == [EOS, SPACE]
    state = lex.advance(lex.start, tok.encode("a"))
    assert lex.final[state] and lex.allowed(state) == [EOS, SPACE, 4 + LETTERS.index("b")]  # "a" ends, "ab" goes on
    sentence = tok.encode("ab cab a lake hide jab")
    assert lex.final[lex.advance(lex.start, sentence)]
    assert lex.advance(lex.start, tok.encode("ab bag")) == DEAD  # "bag" is no word
    assert lex.advance(lex.start, tok.encode("abcab")) == DEAD  # nor two words run together
    assert not lex.final[lex.advance(lex.start, tok.encode("ab ca"))]  # a word cut short
    mask = lex.mask([lex.start, DEAD])
    assert mask[0].nonzero().flatten().tolist() == [EOS, SPACE] and mask[1].all()
    with pytest.raises(ValueError, match="holds no words"):
        Lexicon(["", "  "], tok)
    class NoBoundaryMark(LetterTokenizer):  # words without sentencepiece's word-start mark: "b" both starts a
        def encode(self, text):              # word and continues "ab", so a state could not tell which
            return [4 + LETTERS.index(c) for c in text.lower()]
    with pytest.raises(ValueError, match="word-start token continues 'AB'"):
        Lexicon(["ab", "b"], NoBoundaryMark())
    lex.max_cached_masks = 3  # the mask rows of visited states are cached, within a bound
    rows = lex.mask(list(range(lex.num_states)))
    assert len(lex._masks) <= 3
    assert [r.nonzero().flatten().tolist() for r in rows] == [lex.allowed(s) for s in range(lex.num_states)]


def test_real_sentencepiece_words_concatenate(tmp_path):
    """With a real sentencepiece model a transcript's tokens are its words' tokens, so every training transcript is
    accepted by the lexicon of its words; the lexicon file skips Kaldi's special entries."""
    from mtp_asr.data.tokenizer import Tokenizer, train_bpe

    sents = ["THE CAT SAT ON THE MAT", "A DOG'S LIFE IS NOT A CAT'S", "ON AND ON AND ON", "MATS AND HATS"]
    for model_type, size in (("char", 40), ("bpe", 40)):
        tok = Tokenizer(train_bpe(sents * 5, tmp_path / model_type, vocab_size=size, model_type=model_type))
        words = tmp_path / f"words-{model_type}.txt"
        words.write_text("<eps> 0\n" + "".join(f"{w} {i}\n" for i, w in enumerate(sorted(set(" ".join(sents).split()))))
                         + "#0 99\n")
        lex = Lexicon.from_file(words, tok)
        assert "<eps>" not in lex.words and "#0" not in lex.words and len(lex) == 14
        for s in sents:
            assert tok.encode(s) == [t for w in s.split() for t in tok.encode(w)]
            assert lex.final[lex.advance(lex.start, tok.encode(s))], (model_type, s)
        assert lex.advance(lex.start, tok.encode("THE CATS")) in (DEAD, *[n for n, f in enumerate(lex.final) if not f])
    with pytest.raises(FileNotFoundError, match="--lexicon"):
        Lexicon.from_file(tmp_path / "missing.txt", tok)


@torch.no_grad()
def reference_greedy(lm, prompt, limit: int, lex: Lexicon) -> tuple[list, bool]:
    """Constrained greedy by the definition: a full causal forward per token, head 1 masked to the allowed tokens."""
    out = []
    while True:
        seq = torch.cat([prompt, lm.embed(torch.tensor(out, dtype=torch.long)).to(prompt.dtype)])
        states = lm.trunk(seq[None], torch.tensor([prompt.shape[0]]), torch.zeros(1, len(seq), dtype=torch.long))
        logits = lm.heads.logits(lm.decoder, 0, states[0][0, -1])
        tok = int(lex.constrain(logits, [lex.advance(lex.start, out)]).argmax())
        if tok == EOS:
            return out, True
        out.append(tok)
        if len(out) >= limit:
            return out, False


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_lossless_methods_reproduce_constrained_greedy(kind):
    lm = tiny_lm(kind, num_heads=3, seed=20 + HEAD_KINDS.index(kind))
    lex = lexicon()
    prefix, lens, limits = random_batch(lm, 24, 300 + HEAD_KINDS.index(kind), max_new=24)
    greedy = generate(lm, prefix, lens, "greedy", max_new_tokens=limits, lexicon=lex)
    free = generate(lm, prefix, lens, "greedy", max_new_tokens=limits)
    assert [h.tokens for h in greedy.hyps] != [h.tokens for h in free.hyps]  # the random model spells no words
    for r, h in enumerate(greedy.hyps):
        assert (h.tokens, h.finished) == reference_greedy(lm, prefix[r, : lens[r]], int(limits[r]), lex), f"row {r}"
        assert is_words(h.tokens, lex, h.finished)
    drafts = [lex_words_tokens(r) for r in range(24)]  # words, some of them right
    runs = {
        "mtp-verify": dict(method="mtp-verify"),
        "mtp-verify tree": dict(method="mtp-verify", draft_tree=(2, 2)),
        "ctc-verify": dict(method="ctc-verify", drafts=[h.tokens[:5] + d for h, d in zip(greedy.hyps, drafts)],
                           max_draft=6),
    }
    for name, kw in runs.items():
        batched = generate(lm, prefix, lens, max_new_tokens=limits, lexicon=lex, **kw)
        assert [h.tokens for h in batched.hyps] == [h.tokens for h in greedy.hyps], name
        for r in range(0, 24, 5):  # and one row alone, as batching must not matter
            one = {k: (v[r:r + 1] if k == "drafts" else v) for k, v in kw.items()}
            alone = generate(lm, prefix[r:r + 1, : lens[r]], lens[r:r + 1], max_new_tokens=limits[r:r + 1],
                             lexicon=lex, **one)
            assert alone.hyps[0].tokens == greedy.hyps[r].tokens, (name, r)
    over_one = generate(lm, prefix, lens, "mtp-threshold", threshold=1.01, max_new_tokens=limits, lexicon=lex)
    assert [h.tokens for h in over_one.hyps] == [h.tokens for h in greedy.hyps]


def lex_words_tokens(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    words = [WORDS[i] for i in torch.randint(len(WORDS), (4,), generator=g).tolist()]
    return LetterTokenizer().encode(" ".join(words))


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_threshold_and_beam_emit_words_only(kind):
    lm = tiny_lm(kind, num_heads=3, seed=40 + HEAD_KINDS.index(kind))
    lex = lexicon()
    prefix, lens, limits = random_batch(lm, 16, 500 + HEAD_KINDS.index(kind), max_new=24)
    every = generate(lm, prefix, lens, "mtp-threshold", threshold=0.0, max_new_tokens=limits, lexicon=lex)
    assert all(is_words(h.tokens, lex, h.finished) for h in every.hyps)
    assert sum(every.accepted_per_head[1:]) > 0  # heads 2..K's tokens were emitted, and they spell words too
    for tau in (0.0, 0.4):
        one = beam_search(lm, prefix, lens, "mtp-beam", threshold=tau, beam_size=1, max_new_tokens=limits,
                          lexicon=lex)
        want = generate(lm, prefix, lens, "mtp-threshold", threshold=tau, max_new_tokens=limits, lexicon=lex)
        assert [(h.tokens, h.decoder_calls) for h in one.hyps] == [(h.tokens, h.decoder_calls) for h in want.hyps]
    greedy = generate(lm, prefix, lens, "greedy", max_new_tokens=limits, lexicon=lex)
    beam1 = beam_search(lm, prefix, lens, "beam", beam_size=1, max_new_tokens=limits, lexicon=lex)
    assert [h.tokens for h in beam1.hyps] == [h.tokens for h in greedy.hyps]
    for method, tau in (("beam", 1.0), ("mtp-beam", 0.3)):
        out = beam_search(lm, prefix, lens, method, threshold=tau, beam_size=4, max_new_tokens=limits, lexicon=lex)
        for hs in out.nbest:
            assert all(is_words(h.tokens, lex, h.finished) and h.score > float("-inf") for h in hs)
        alone = [beam_search(lm, prefix[r:r + 1, : lens[r]], lens[r:r + 1], method, threshold=tau, beam_size=4,
                             max_new_tokens=limits[r:r + 1], lexicon=lex).hyps[0].tokens for r in range(16)]
        assert [h.tokens for h in out.hyps] == alone


def test_decode_command_with_a_lexicon(tmp_path):
    from train_fixtures import WORDS as CORPUS_WORDS, make_corpus

    from mtp_asr.cli import main

    corpus = make_corpus(tmp_path / "corpus", n_train=4, n_valid=5)
    ckpt = speech_checkpoint(tmp_path / "exp" / "epoch-1.pt", corpus["tokenizer"])
    words = tmp_path / "words.txt"
    words.write_text("\n".join(CORPUS_WORDS[:3]) + "\n")
    out = tmp_path / "out"
    args = ["decode", "--checkpoint", str(ckpt), "--cuts", str(corpus["valid"]), "--method", "mtp-verify",
            "--lexicon", str(words), "--batch-size", "2", "--device", "cpu", "--out-dir", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary-valid-epoch-1-mtp-verify-lex-bs2.json").read_text())
    assert summary["lexicon"] == str(words)
    lines = (out / "recogs-valid-epoch-1-mtp-verify-lex-bs2.txt").read_text().splitlines()
    hyps = [w for line in lines if "\thyp=" in line for w in ast.literal_eval(line.split("\thyp=", 1)[1])]
    assert hyps and set(hyps) <= set(CORPUS_WORDS[:3])
    missing = CliRunner().invoke(main, args[:8] + [str(tmp_path / "none.txt")] + args[9:])
    assert missing.exit_code != 0 and "--lexicon" in missing.output
