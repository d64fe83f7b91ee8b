"""make_corpus (local/synth) without TTS engines or text packages: a made-up sentence pool and a fake renderer, to
check how failed syntheses end up in failed.txt, the data dirs and the errors. (tests/test_synth.py runs the real
engines and skips where they are not installed.)"""
import importlib.util
import itertools
import random
from pathlib import Path

import pytest

SYNTH_DIR = Path(__file__).resolve().parents[1] / "local" / "synth"
SPLITS = ("train", "dev", "test", "test_unseen_voice")
ENGINES = ["espeak", "flite"]


def _load_make_corpus():
    """Load make_corpus.py by file path, as the CLI does."""
    spec = importlib.util.spec_from_file_location("synth_make_corpus", SYNTH_DIR / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mc = _load_make_corpus()
import synth_sentences  # noqa: E402  (make_corpus put local/synth on sys.path)

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "red", "mat", "big", "house", "near", "old", "tree"]


def sentence_pool(n: int = 90) -> "synth_sentences.SentencePool":
    """n distinct six-word sentences, enough for passages of every split of a tiny corpus."""
    rng = random.Random(0)
    texts = set()
    while len(texts) < n:
        texts.add(" ".join(rng.choice(WORDS) for _ in range(6)).upper())
    sentences = tuple(synth_sentences.Sentence(t, t.lower()) for t in sorted(texts))
    return synth_sentences.SentencePool(sentences, (), tuple(sorted(w.upper() for w in WORDS)), n)


def source_documents() -> tuple:
    """The made-up pool's sentences in documents of three, each with a sentence of other words (n-gram LM text)."""
    texts = [s.text for s in sentence_pool().sentences]
    return tuple(tuple((t, t) for t in texts[i:i + 3]) + ((f"OTHER WORDS {i}", ""),) for i in range(0, len(texts), 3))


@pytest.fixture
def fake_synthesis(monkeypatch):
    """make_corpus on the made-up pool with a renderer that writes nothing: `fail(job)` decides which utterances
    fail; returns a dict of the utterance ids attempted and failed, per split."""
    monkeypatch.setattr(mc, "load_sentence_pool", lambda vocab_size: sentence_pool())
    monkeypatch.setattr(mc, "source_documents", source_documents)
    seen = {"attempted": {s: set() for s in SPLITS}, "failed": {s: set() for s in SPLITS}, "fail": lambda job: False}

    def render_batch(batch):
        results = []
        for job in batch.jobs:
            split = Path(job.out_path).parent.name  # wav/<split>/<utt_id>.wav
            seen["attempted"][split].add(job.utt_id)
            if seen["fail"](job):
                seen["failed"][split].add(job.utt_id)
                results.append((job.utt_id, None, f"{batch.engine} exited with status 1"))
            else:
                results.append((job.utt_id, 4.0, None))
        return results

    monkeypatch.setattr(mc, "render_batch", render_batch)
    return seen


def in_split(*splits):
    return lambda job: Path(job.out_path).parent.name in splits


def failed_lines(out: Path) -> dict:
    return {line.split("\t")[0]: line for line in (out / "failed.txt").read_text().splitlines()}


@pytest.mark.parametrize("failing", [("test_unseen_voice",), ("dev", "test")])
def test_a_split_whose_every_synthesis_failed_is_an_error(fake_synthesis, tmp_path, failing):
    fake_synthesis["fail"] = in_split(*failing)
    out = tmp_path / "c"
    expected = f"no synthesis of split(s) {', '.join(failing)} succeeded: see {out / 'failed.txt'}"
    with pytest.raises(RuntimeError) as error:
        mc.make_corpus(out, hours=0.01, seed=0, jobs=1, engines=ENGINES)
    assert str(error.value) == expected
    # Every split was tried; failed.txt lists exactly the failed utterances, with engine/voice and the error.
    assert all(len(fake_synthesis["attempted"][s]) >= 3 for s in SPLITS)
    failed = set().union(*(fake_synthesis["attempted"][s] for s in failing))
    lines = failed_lines(out)
    assert set().union(*fake_synthesis["failed"].values()) == failed and lines.keys() == failed
    assert all("\tespeak/" in line or "\tflite/" in line for line in lines.values())
    assert all(line.endswith("exited with status 1") for line in lines.values())
    # No data dir at all (not empty ones for the failed splits, nor a corpus that looks complete) and no stats.
    assert sorted(p.name for p in out.iterdir()) == ["failed.txt"]


def test_all_syntheses_failing_is_an_error(fake_synthesis, tmp_path):
    fake_synthesis["fail"] = lambda job: True
    out = tmp_path / "c"
    with pytest.raises(RuntimeError, match=r"all (\d+) syntheses failed") as error:
        mc.make_corpus(out, hours=0.01, seed=0, jobs=1, engines=ENGINES)
    attempted = set().union(*fake_synthesis["attempted"].values())
    assert f"all {len(attempted)} syntheses failed: see {out / 'failed.txt'}" == str(error.value)
    assert failed_lines(out).keys() == attempted
    assert sorted(p.name for p in out.iterdir()) == ["failed.txt"]


def test_a_split_with_one_synthesis_left_is_written(fake_synthesis, tmp_path):
    # All but the first utterance of test_unseen_voice fail: the split keeps that one, and the corpus is written.
    counter = itertools.count()
    fake_synthesis["fail"] = lambda job: in_split("test_unseen_voice")(job) and next(counter) > 0
    out = tmp_path / "c"
    stats = mc.make_corpus(out, hours=0.01, seed=0, jobs=1, engines=ENGINES)
    unseen = fake_synthesis["attempted"]["test_unseen_voice"]
    failed = fake_synthesis["failed"]["test_unseen_voice"]
    assert len(unseen) >= 3 and len(failed) == len(unseen) - 1
    assert failed_lines(out).keys() == failed and stats["failed_syntheses"] == len(failed)
    for split in SPLITS:
        listed = {line.split(" ", 1)[0] for line in (out / split / "text").read_text().splitlines()}
        assert listed == fake_synthesis["attempted"][split] - fake_synthesis["failed"][split]
        assert stats["splits"][split]["utterances"] == len(listed)
    assert stats["splits"]["test_unseen_voice"]["utterances"] == 1
    assert (out / "stats.json").is_file()


def test_ngram_text_is_the_documents_without_an_eval_sentence(fake_synthesis, tmp_path):
    out = tmp_path / "c"
    stats = mc.make_corpus(out, hours=0.01, seed=0, jobs=1, engines=ENGINES)
    held_out = {line.split(" ", 1)[1] for split in SPLITS[1:]
                for line in (out / split / "text").read_text().splitlines()}
    held_sentences = {s.text for s in sentence_pool().sentences if any(f" {s.text} " in f" {p} " for p in held_out)}
    lines = set((out / "ngram_text.txt").read_text().splitlines())
    for document in source_documents():
        texts = {t for t, _ in document}
        assert (texts <= lines) == (not texts & held_sentences), document
        assert not (texts & lines and texts & held_sentences)
    assert stats["ngram_text_documents_dropped"] == sum(bool({t for t, _ in d} & held_sentences)
                                                        for d in source_documents()) > 0
    assert len(lines) == stats["ngram_text_lines"] and any(t.startswith("OTHER WORDS") for t in lines)
