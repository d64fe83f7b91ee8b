"""Word n-gram LMs (mtp_asr.ngram): Kneser-Ney estimates against a hand computation, normalisation, the continuation
counts, ARPA files (written, read back, read by hand), errors naming the file and line, and `mtp-asr train-ngram`."""
import gzip
import math
import random

import pytest
from click.testing import CliRunner

from mtp_asr.ngram import BOS, EOS, UNK, NgramLM, WordVectors, train_kneser_ney

WORDS = ["A", "B", "C", "D", "E", "F"]


def random_text(n: int = 60, seed: int = 0) -> list:
    rng = random.Random(seed)
    weights = [8, 5, 3, 2, 1, 1]
    return [rng.choices(WORDS, weights, k=rng.randint(1, 7)) for _ in range(n)]


def test_kneser_ney_by_hand():
    # Bigrams (<s> A)x3 (A B)x2 (B </s>)x2 (C </s>)x2 (A C) (<s> B) (B C): count-of-counts 3, 3, 1, 0 -- too few for
    # the estimated discounts, so 0.5 / 1 / 1.5. Continuation counts: A 1 (after <s>), B 2, C 2, </s> 2 (total 7).
    lm = train_kneser_ney([["A", "B"], ["A", "B"], ["A", "C"], ["B", "C"]], order=2)
    vocab = 5  # A B C </s> <unk>
    gamma0 = (0.5 * 1 + 1.0 * 3) / 7  # one continuation count of 1 (A), three of 2
    p1 = {"A": 0.5 / 7 + gamma0 / vocab, "B": 1 / 7 + gamma0 / vocab, EOS: 1 / 7 + gamma0 / vocab,
          UNK: gamma0 / vocab}
    for w, p in p1.items():
        assert lm.logprob([], w) == pytest.approx(math.log(p), abs=1e-12)
    gamma_a = (0.5 * 1 + 1.0 * 1) / 3  # after A: B twice, C once
    assert lm.logprob(["A"], "B") == pytest.approx(math.log(1 / 3 + gamma_a * p1["B"]), abs=1e-12)
    assert lm.logprob(["A"], EOS) == pytest.approx(math.log(gamma_a * p1[EOS]), abs=1e-12)  # backed off
    assert lm.logprob(["A"], "ZZZ") == lm.logprob(["A"], UNK)  # an unknown word is <unk>
    assert lm.logprob([], BOS) == float("-inf")


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_every_context_is_a_distribution(order):
    lm = train_kneser_ney(random_text(), order)
    predicted = [w for w in lm.vocab if w != BOS]
    vectors = WordVectors(lm, predicted)
    for history in ([], [BOS], ["A"], [BOS, "A", "B"], ["F", "F", "F"], ["ZZZ", "A"]):
        probs = [math.exp(lm.logprob(history, w)) for w in predicted]
        assert sum(probs) == pytest.approx(1.0, abs=1e-9), history
        vector = vectors(history)  # all words at once, from the cached vectors of shorter contexts
        assert [math.exp(v) for v in vector] == pytest.approx(probs, abs=1e-12)


def test_repeated_text_keeps_probability_to_back_off_with():
    # Most sentences three times, a few once, one twice: the estimated discount for count 2 is negative (-2.25),
    # and the contexts of "X Y Z" have only followers seen twice.
    text = random_text(40) * 3 + random_text(3, seed=1) + [["X", "Y", "Z"]] * 2
    lm = train_kneser_ney(text, 3)
    assert all(math.isfinite(b) for b in lm.bow.values())
    assert math.isfinite(lm.sentence_logprob(["X", "Y", "A"]))


def test_continuation_counts():
    # "Y" is as frequent as "X" but only ever follows "Q": Kneser-Ney gives it the smaller unigram share.
    text = [["Q", "Y"]] * 6 + [[w, "X"] for w in "ABCDEF"] + [["Q", "A"]]
    lm = train_kneser_ney(text, order=2)
    assert lm.logprob([], "X") > lm.logprob([], "Y") + 1
    assert lm.logprob(["Q"], "Y") > lm.logprob(["Q"], "X")


@pytest.mark.parametrize("name", ["lm.arpa", "lm.arpa.gz"])
def test_arpa_round_trip(tmp_path, name):
    text = random_text()
    lm = train_kneser_ney(text, 3)
    lm.write_arpa(tmp_path / name)
    back = NgramLM.read_arpa(tmp_path / name)
    assert back.order == 3 and back.vocab == lm.vocab
    for words in text[:20] + [["F", "A", "ZZZ", "C"]]:
        assert back.sentence_logprob(words) == pytest.approx(lm.sentence_logprob(words), abs=1e-4)
    opener = gzip.open if name.endswith(".gz") else open
    with opener(tmp_path / name, "rt") as f:
        lines = f.read().splitlines()
    assert f"ngram 3={sum(len(g) == 3 for g in lm.prob)}" in lines
    assert any(line.startswith("-99.000000\t<s>\t") for line in lines)  # <s>: never predicted, has a back-off


def test_reading_for_a_vocabulary_keeps_its_sentences_probabilities(tmp_path):
    lm = train_kneser_ney(random_text(), 3)
    lm.write_arpa(tmp_path / "lm.arpa")
    small = NgramLM.read_arpa(tmp_path / "lm.arpa", vocabulary=["A", "B", "C"])
    assert len(small.prob) < len(lm.prob) and all(set(g) <= {"A", "B", "C", BOS, EOS, UNK} for g in small.prob
                                                     if len(g) > 1)
    for words in [["A", "B", "C"], ["C", "C", "A", "B", "A"], ["B"]]:
        assert small.sentence_logprob(words) == pytest.approx(lm.sentence_logprob(words), abs=1e-4)


def test_reads_back_off_by_hand(tmp_path):
    arpa = tmp_path / "hand.arpa"
    arpa.write_text("\\data\\\nngram 1=4\nngram 2=2\n\n\\1-grams:\n-99\t<s>\t-0.3\n-0.5\tA\t-0.2\n-0.7\tB\t-0.1\n"
                    "-0.9\t</s>\n\n\\2-grams:\n-0.1\t<s> A\n-0.4\tA B\n\n\\end\\\n")
    lm = NgramLM.read_arpa(arpa)
    ln10 = math.log(10)
    assert lm.logprob([BOS], "A") == pytest.approx(-0.1 * ln10)
    assert lm.logprob(["A"], "B") == pytest.approx(-0.4 * ln10)
    assert lm.logprob(["A"], EOS) == pytest.approx((-0.2 - 0.9) * ln10)  # bow(A) + P(</s>)
    assert lm.logprob(["B"], "A") == pytest.approx((-0.1 - 0.5) * ln10)
    assert lm.logprob(["B"], "ZZZ") == float("-inf")  # no <unk> in this model


def test_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.arpa"):
        NgramLM.read_arpa(tmp_path / "missing.arpa")
    bad = tmp_path / "bad.arpa"
    bad.write_text("\\data\\\nngram 1=2\n\n\\1-grams:\n-0.5\tA\n-0.5 </s> x y\n")
    with pytest.raises(ValueError, match=r"bad.arpa:6: not an ARPA 1-gram line"):
        NgramLM.read_arpa(bad)
    (tmp_path / "empty.arpa").write_text("hello\n")
    with pytest.raises(ValueError, match="not an ARPA"):
        NgramLM.read_arpa(tmp_path / "empty.arpa")
    with pytest.raises(ValueError, match="no sentences"):
        train_kneser_ney([], 3)
    with pytest.raises(ValueError, match="order must be >= 1"):
        train_kneser_ney(random_text(), 0)


def test_train_ngram_command(tmp_path):
    from mtp_asr.cli import main

    text = tmp_path / "text.txt"
    text.write_text("".join(" ".join(s).lower() + ".\n" for s in random_text()))  # normalised as transcripts
    out = tmp_path / "lm" / "word-3gram.arpa.gz"
    result = CliRunner().invoke(main, ["train-ngram", str(text), str(out), "--order", "3"])
    assert result.exit_code == 0, result.output
    lm = NgramLM.read_arpa(out)
    assert lm.order == 3 and set(WORDS) <= set(lm.vocab)
    expected = train_kneser_ney(random_text(), 3)
    assert lm.sentence_logprob(["A", "B"]) == pytest.approx(expected.sentence_logprob(["A", "B"]), abs=1e-4)
    # Bad input: a clear error naming the file and line, and the LM written before is untouched.
    before = out.read_bytes()
    (tmp_path / "bad.txt").write_bytes(b"A B\n\xff\xfe\n")
    result = CliRunner().invoke(main, ["train-ngram", str(tmp_path / "bad.txt"), str(out)])
    assert result.exit_code != 0 and "bad.txt:2" in result.output
    assert out.read_bytes() == before
