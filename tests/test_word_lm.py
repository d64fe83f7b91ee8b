"""Word n-gram LM fusion (mtp_asr.decode.word_lm): the look-ahead against brute-force sums, charges that add up to
the sentence's LM log-probability, the searches' scores against an independent recomputation, the reductions, an LM
that steers the search, and the options through decode_cuts and the command line."""
import itertools
import json
import math
import random

import pytest
import torch
from click.testing import CliRunner

from model_fixtures import EOS, random_batch, single_thread, tiny_lm  # noqa: F401
from mtp_asr.decode.beam import beam_search
from mtp_asr.decode.ctc_prefix import CTCPrefixScorer
from mtp_asr.decode.lexicon import Lexicon
from mtp_asr.decode.rescore import ctc_sequence_log_probs
from mtp_asr.decode.verify_beam import verify_beam_search
from mtp_asr.decode.word_lm import WordLM
from mtp_asr.ngram import BOS, train_kneser_ney
from test_lexicon import WORDS, LetterTokenizer

TOKENIZER = LetterTokenizer()


def word_text(n: int = 80, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [[w.upper() for w in rng.choices(WORDS, k=rng.randint(1, 5))] for _ in range(n)]


def word_lm(weight: float = 1.0, order: int = 3, text=None) -> WordLM:
    return WordLM(train_kneser_ney(text or word_text(), order), Lexicon(WORDS, TOKENIZER), weight)


def spelled(words: list) -> list:
    return TOKENIZER.encode(" ".join(words))


def test_lookahead_is_the_probability_of_the_words_below():
    lm = word_lm()
    lex = lm.lexicon
    for history in [(BOS, BOS), (BOS, "AB"), ("CAB", "A"), ("ZZZ", "HIDE")]:
        for word in lex.words:  # every state on the way through each word
            tokens = TOKENIZER.encode(word)
            for n in range(1, len(tokens) + 1):
                state = lex.advance(lex.start, tokens[:n])
                below = [w for w in lex.words if TOKENIZER.encode(w)[:n] == tokens[:n]]
                expected = math.log(sum(math.exp(lm.ngram.logprob(list(history), w)) for w in below))
                assert lm._lookahead(history, state) == pytest.approx(expected, abs=1e-9), (history, word, n)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_charges_add_up_to_the_sentence_log_probability(order):
    lm = word_lm(order=order)
    for words in word_text(30, seed=1) + [[], ["A", "AB", "A"]]:  # A is a prefix of AB: ends decided late
        history, state, total = lm.start, lm.lexicon.start, 0.0
        for tok in spelled(words) + [EOS]:
            charge, history = lm.step(history, state, tok)
            total += charge
            state = lm.lexicon.step(state, tok)
        assert total == pytest.approx(lm.ngram.sentence_logprob(words), abs=1e-9), words


def constrained_scores(lm, prefix, prefix_lens, row: int, tokens: list, lexicon: Lexicon) -> float:
    """log p(tokens, EOS) under head 1 with every position's logits masked to what the lexicon allows there (one
    uncached pass over prompt + tokens)."""
    x, labels = lm.append_tokens(prefix[[row]], prefix_lens[[row]], [tokens])
    states = lm.trunk(x, prefix_lens[[row]], labels)
    total, state = 0.0, lexicon.start
    for j, target in enumerate(tokens + [EOS]):
        logits = lm.heads.logits(lm.decoder, 0, states[0][0, int(prefix_lens[row]) - 1 + j]).double()
        logits = lexicon.constrain(logits[None], [state])[0]
        total += torch.log_softmax(logits, -1)[target].item()
        if j < len(tokens):
            state = lexicon.step(state, target)
    return total


@pytest.mark.parametrize("method,kind,ctc_weight", [("beam", "latent", 0.0), ("beam", "hydra", 0.4),
                                                     ("mtp-beam-verify", "hydra", 0.0),
                                                     ("mtp-beam-verify", "linear", 0.4)])
def test_fused_scores_are_the_weighted_sums(method, kind, ctc_weight):
    lm = tiny_lm(kind, num_heads=3)
    prefix, prefix_lens, _ = random_batch(lm, 3, seed=5)
    V = lm.decoder.cfg.vocab_size
    fusion = word_lm(weight=0.7)
    g = torch.Generator().manual_seed(6)
    log_probs = torch.log_softmax(0.5 * torch.randn(3, 20, V + 1, generator=g, dtype=torch.float64), -1)
    lens = torch.tensor([20, 17, 15])
    with torch.no_grad():
        scorer = CTCPrefixScorer(log_probs, lens, V, EOS) if ctc_weight else None
        if method == "beam":
            out = beam_search(lm, prefix, prefix_lens, "beam", max_new_tokens=40, beam_size=4,
                              lexicon=fusion.lexicon, ctc=scorer, ctc_weight=ctc_weight, word_lm=fusion)
        else:
            out = verify_beam_search(lm, prefix, prefix_lens, None, 40, 4, lexicon=fusion.lexicon, ctc=scorer,
                                     ctc_weight=ctc_weight, word_lm=fusion)
        checked = 0
        for r, hyps in enumerate(out.nbest):
            for h in hyps:
                if not h.finished:
                    continue
                decoder = constrained_scores(lm, prefix, prefix_lens, r, h.tokens, fusion.lexicon)
                ctc = ctc_sequence_log_probs(log_probs[r, : lens[r]], [h.tokens], V)[0].item() if ctc_weight else 0
                if ctc == float("-inf"):  # longer than the frames hold: the CTC floor (tests/test_joint_ctc.py)
                    continue
                words = TOKENIZER_words(h.tokens)
                expected = (1 - ctc_weight) * decoder + ctc_weight * ctc + 0.7 * fusion.ngram.sentence_logprob(words)
                assert h.score == pytest.approx(expected, abs=1e-4)
                checked += 1
    assert checked >= 4


def TOKENIZER_words(tokens: list) -> list:
    """The words a LetterTokenizer token sequence spells."""
    from test_lexicon import LETTERS, SPACE

    return "".join(" " if t == SPACE else LETTERS[t - 4] for t in tokens).upper().split()


def test_reductions_and_checks():
    lm = tiny_lm("hydra", num_heads=3)
    prefix, prefix_lens, _ = random_batch(lm, 4, seed=7)
    zero, fused = word_lm(weight=0.0), word_lm(weight=1.0)
    lexicon = zero.lexicon
    fused.lexicon = lexicon
    with torch.no_grad():
        # Weight 0: the joint path (pre-beam, then top B) picks what plain beam picks.
        plain = beam_search(lm, prefix, prefix_lens, "beam", max_new_tokens=10, beam_size=3, lexicon=lexicon)
        none = beam_search(lm, prefix, prefix_lens, "beam", max_new_tokens=10, beam_size=3, lexicon=lexicon,
                           word_lm=zero)
        assert [[h.tokens for h in hs] for hs in none.nbest] == [[h.tokens for h in hs] for hs in plain.nbest]
        # mtp-beam-verify with one head is fused beam: the same N-best lists and calls.
        beam = beam_search(lm, prefix, prefix_lens, "beam", max_new_tokens=10, beam_size=3, lexicon=lexicon,
                           word_lm=fused)
        one_head = verify_beam_search(lm, prefix, prefix_lens, 1, 10, 3, lexicon=lexicon, word_lm=fused)
        assert [[(h.tokens, round(h.score, 6)) for h in hs] for hs in one_head.nbest] == \
            [[(h.tokens, round(h.score, 6)) for h in hs] for hs in beam.nbest]
        assert [h.decoder_calls for h in one_head.hyps] == [h.decoder_calls for h in beam.hyps]
        with pytest.raises(ValueError, match="built for `beam` only"):
            beam_search(lm, prefix, prefix_lens, "mtp-beam", lexicon=lexicon, word_lm=fused)
        with pytest.raises(ValueError, match="the word LM's lexicon"):
            beam_search(lm, prefix, prefix_lens, "beam", word_lm=fused)
        with pytest.raises(ValueError, match="the word LM's lexicon"):
            verify_beam_search(lm, prefix, prefix_lens, lexicon=Lexicon(WORDS, TOKENIZER), word_lm=fused)
    with pytest.raises(ValueError, match="weight must be >= 0"):
        word_lm(weight=-1)


@pytest.mark.parametrize("method", ["beam", "mtp-beam-verify"])
def test_the_word_lm_steers_the_search(method):
    """An LM that has only ever seen one sentence, weighted heavily: the (random) decoder's search emits it."""
    lm = tiny_lm("hydra", num_heads=3)
    prefix, prefix_lens, _ = random_batch(lm, 2, seed=9)
    sentence = ["CAB", "FIG", "A"]
    fusion = word_lm(weight=20.0, order=2, text=[sentence] * 20 + [[w.upper()] for w in WORDS])
    with torch.no_grad():
        search = beam_search if method == "beam" else verify_beam_search
        args = ("beam",) if method == "beam" else (None,)
        fused = search(lm, prefix, prefix_lens, *args, max_new_tokens=16, beam_size=4, lexicon=fusion.lexicon,
                       word_lm=fusion)
        plain = search(lm, prefix, prefix_lens, *args, max_new_tokens=16, beam_size=4, lexicon=fusion.lexicon)
    assert [h.tokens for h in fused.hyps] == [spelled(sentence)] * 2
    assert [h.tokens for h in plain.hyps] != [spelled(sentence)] * 2


def test_decode_with_a_word_lm(small_corpus, small_checkpoint, tmp_path):
    from mtp_asr.cli import main
    from mtp_asr.data.dataset import read_cuts
    from mtp_asr.decode.runner import DecodeSettings, decode_cuts
    from mtp_asr.model.build import load_speech_model

    model, tokenizer, _ = load_speech_model(small_checkpoint)
    cuts = read_cuts(small_corpus["valid"])
    words = sorted({w for c in cuts for s in c.supervisions for w in s.text.split()})
    lexicon = tmp_path / "words.txt"
    lexicon.write_text("".join(f"{w}\n" for w in words))
    arpa = tmp_path / "lm.arpa"
    train_kneser_ney([s.text.split() for c in cuts for s in c.supervisions], 2).write_arpa(arpa)
    for method in ("beam", "mtp-beam-verify"):
        settings = DecodeSettings(method, beam_size=2, ctc_weight=0.3, lexicon=str(lexicon), word_lm=str(arpa),
                                  lm_weight=0.8)
        res = decode_cuts(model, tokenizer, cuts, settings, 3)
        summary = res.summary()
        assert len(res.results) == len(cuts) and summary["word_lm"] == str(arpa) and summary["lm_weight"] == 0.8
        assert "-ctc0.3-lm0.8-lex-" in settings.label()
        assert all(set(hyp.split()) <= set(words) for _, _, hyp in res.results)
    with pytest.raises(ValueError, match="--word-lm applies to beam and mtp-beam-verify only"):
        DecodeSettings("greedy", lexicon=str(lexicon), word_lm=str(arpa))
    with pytest.raises(ValueError, match="--word-lm needs --lexicon"):
        DecodeSettings("beam", word_lm=str(arpa))
    with pytest.raises(ValueError, match="--word-lm .*missing.arpa does not exist"):
        DecodeSettings("beam", lexicon=str(lexicon), word_lm=str(tmp_path / "missing.arpa"))

    out = tmp_path / "out"
    args = ["decode", "--checkpoint", str(small_checkpoint), "--cuts", str(small_corpus["valid"]), "--method",
            "beam", "--word-lm", str(arpa), "--lexicon", str(lexicon), "--beam-size", "2", "--batch-size", "2",
            "--device", "cpu", "--out-dir", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (summary,) = [json.loads(p.read_text()) for p in out.glob("summary-*-beam-lm0.5-lex-B2-bs2.json")]
    assert summary["word_lm"] == str(arpa) and summary["lm_weight"] == 0.5 and summary["ctc_weight"] is None
    without_beam = args[:11] + args[13:]
    refused = CliRunner().invoke(main, without_beam[:6] + ["greedy"] + without_beam[7:])
    assert refused.exit_code != 0 and "--word-lm" in refused.output, refused.output
    without_lm = args[:7] + args[9:]
    refused = CliRunner().invoke(main, without_lm + ["--lm-weight", "0.3"])
    assert refused.exit_code != 0 and "needs --word-lm" in refused.output, refused.output
    broken = tmp_path / "broken.arpa"
    broken.write_text("\\data\\\n\\1-grams:\nnot a line\n")
    result = CliRunner().invoke(main, args[:7] + ["--word-lm", str(broken)] + args[9:])
    assert result.exit_code != 0 and "broken.arpa:3" in result.output
    assert not list(out.glob("*broken*"))

    bench = tmp_path / "bench"
    result = CliRunner().invoke(main, ["benchmark", "--checkpoint", str(small_checkpoint), "--cuts",
                                       str(small_corpus["valid"]), "--batch-sizes", "2", "--beam-size", "2",
                                       "--device", "cpu", "--num-threads", "1", "--lexicon", str(lexicon),
                                       "--ctc-weight", "0.5", "--word-lm", str(arpa), "--out-dir", str(bench)])
    assert result.exit_code == 0, result.output
    rows = json.loads((bench / "benchmark.json").read_text())["rows"]
    assert [r["method"] for r in rows][-4:] == ["beam-ctc0.5-lex-B2", "mtp-beam-verify-ctc0.5-lex-B2",
                                                "beam-ctc0.5-lm0.5-lex-B2", "mtp-beam-verify-ctc0.5-lm0.5-lex-B2"]
