"""The synthetic demo corpus generator (local/synth): formats, passages, splits, LM text, determinism, failures."""
import collections
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mtp_asr.text import normalize_text

SYNTH_DIR = Path(__file__).resolve().parents[1] / "local" / "synth"
SPLITS = ("train", "dev", "test", "test_unseen_voice")
ENGINES = ["espeak", "flite"]  # the two fastest; festival and hibari run in the recipe


def _load_make_corpus():
    """Load make_corpus.py by file path, as the CLI does."""
    spec = importlib.util.spec_from_file_location("synth_make_corpus", SYNTH_DIR / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mc = _load_make_corpus()
import synth_passages  # noqa: E402  (make_corpus put local/synth on sys.path)
import synth_render  # noqa: E402
import synth_sentences  # noqa: E402
import synth_voices  # noqa: E402

pytestmark = pytest.mark.skipif(
    any(not Path(p).exists() for p in ("/usr/bin/espeak-ng", "/usr/bin/flite", "/usr/bin/sox",
                                        "/usr/share/wordnet", "/usr/share/games/fortunes")),
    reason="needs the Debian packages espeak-ng, flite, sox, wordnet-base, fortunes (tools/install.sh)",
)


def read_kaldi(path: Path) -> list:
    return [line.rstrip("\n").split(" ", 1) for line in path.read_text().splitlines()]


def read_split(out_dir: Path, split: str) -> dict:
    return {name: dict(read_kaldi(out_dir / split / name)) for name in ("wav.scp", "text", "utt2spk")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    stats = mc.make_corpus(out, hours=0.01, seed=0, jobs=2, engines=ENGINES)
    return out, stats


def read_records(out_dir: Path) -> list:
    return [json.loads(line) for line in (out_dir / "utterances.jsonl").read_text().splitlines()]


def test_kaldi_dirs_and_wav_format(corpus):
    out, stats = corpus
    assert json.loads((out / "stats.json").read_text()) == stats
    all_words, all_seconds = [], []
    for split in SPLITS:
        for name in ("wav.scp", "text", "utt2spk"):
            ids = [row[0] for row in read_kaldi(out / split / name)]
            assert ids == sorted(ids) and len(ids) == len(set(ids)), f"{split}/{name} not sorted/unique"
        data = read_split(out, split)
        assert data["wav.scp"].keys() == data["text"].keys() == data["utt2spk"].keys()
        assert len(data["text"]) == stats["splits"][split]["utterances"] >= 3
        seconds = []
        for utt, path in data["wav.scp"].items():
            path = Path(path)
            assert path.is_absolute() and path.parent == out.resolve() / "wav" / split
            info = sf.info(str(path))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            seconds.append(info.duration)
            assert utt.startswith(data["utt2spk"][utt] + "-")
        words = [len(text.split()) for text in data["text"].values()]
        assert all(text == normalize_text(text) for text in data["text"].values())
        assert stats["splits"][split]["words_per_utterance"] == {
            "min": min(words), "mean": round(sum(words) / len(words), 2), "max": max(words)}
        assert stats["splits"][split]["seconds_per_utterance"]["min"] == round(min(seconds), 2)
        all_words += words
        all_seconds += seconds
    assert 12 <= stats["words_per_utterance"]["mean"] <= 24 and max(all_words) <= synth_passages.MAX_WORDS
    assert 3.0 < sum(all_seconds) / len(all_seconds) < 9.0  # passages, not single sentences (~1.9 s)
    assert stats["failed_syntheses"] == 0 and (out / "failed.txt").read_text() == ""
    assert stats["utterances"] == sum(s["utterances"] for s in stats["splits"].values())
    assert 0.005 < stats["hours"] < 0.03 and stats["hours_asked"] == 0.01
    assert 100 < stats["vocabulary_size"] <= synth_sentences.VOCAB_SIZE
    assert stats["engines"] == ENGINES and sum(stats["utterances_per_engine"].values()) == stats["utterances"]


def test_utterances_are_passages_of_several_sentences(corpus):
    out, stats = corpus
    records = read_records(out)
    texts = {r["utt_id"]: r["text"] for r in records}
    for split in SPLITS:
        assert read_split(out, split)["text"] == {u: texts[u] for u in read_split(out, split)["text"]}
    pool = {s.text for s in synth_sentences.load_sentence_pool().sentences}
    for r in records:
        assert 1 <= len(r["sentences"]) <= 3 and set(r["sentences"]) <= pool
        assert r["text"] == " ".join(r["sentences"])
        assert sum(r["spoken"].count(end) for end in ".!?") >= len(r["sentences"]), r["spoken"]
    assert sum(len(r["sentences"]) >= 2 for r in records) >= 0.8 * len(records)
    assert stats["sentences_per_utterance"]["max"] == 3


def test_splits_disjoint_in_sentences_and_unseen_voices_held_out(corpus):
    out, _ = corpus
    records = read_records(out)
    sentences = {split: {s for r in records if r["split"] == split for s in r["sentences"]} for split in SPLITS}
    assert not sentences["train"] & sentences["dev"]
    assert not sentences["train"] & sentences["test"]
    assert not sentences["dev"] & sentences["test"]
    passages = {split: {r["text"] for r in records if r["split"] == split} for split in SPLITS}
    assert passages["test_unseen_voice"] == passages["test"]
    data = {split: read_split(out, split) for split in SPLITS}
    voices = {split: set(d["utt2spk"].values()) for split, d in data.items()}
    assert not voices["test_unseen_voice"] & (voices["train"] | voices["dev"] | voices["test"])
    held_out = {v.voice_id for v in synth_voices.all_voices() if v.held_out}
    assert voices["test_unseen_voice"] <= held_out
    assert not (voices["train"] | voices["dev"]) & held_out


def test_lm_text_has_sentences_and_train_passages_but_no_eval_sentence(corpus):
    out, stats = corpus
    lines = (out / "lm_text.txt").read_text().splitlines()
    assert lines == sorted(set(lines)) and len(lines) == stats["lm_text_lines"]
    assert all(line == normalize_text(line) for line in lines)
    records = read_records(out)
    held_out = {s for r in records if r["split"] != "train" for s in r["sentences"]}
    pool = [s.text for s in synth_sentences.load_sentence_pool().sentences]
    assert set(lines) >= {s for s in pool if s not in held_out}
    assert set(lines) >= {r["text"] for r in records if r["split"] == "train"}
    assert stats["lm_text_passages"] > stats["splits"]["train"]["utterances"]  # unspoken passages too
    assert sum(len(line.split()) > synth_sentences.MAX_WORDS for line in lines) > 0.5 * stats["lm_text_passages"]
    # No held-out sentence as a line, nor inside one, unless a sentence of the LM text contains it anyway.
    assert not held_out & set(lines)
    for sentence in held_out:
        inside = [line for line in lines if f" {sentence} " in f" {line} "]
        assert all(any(f" {sentence} " in f" {s} " for s in pool if s not in held_out and s in line)
                   for line in inside), sentence


def test_ngram_text_leaves_out_every_document_of_an_eval_sentence(corpus):
    out, stats = corpus
    lines = (out / "ngram_text.txt").read_text().splitlines()
    assert lines == sorted(set(lines)) and len(lines) == stats["ngram_text_lines"]
    assert all(line == normalize_text(line) for line in lines)
    held_out = {s for r in read_records(out) if r["split"] != "train" for s in r["sentences"]}
    documents = synth_sentences.source_documents()
    dropped = [d for d in documents if any(t in held_out or p in held_out for t, p in d)]
    assert len(dropped) == stats["ngram_text_documents_dropped"] > 0
    kept = {t for d in documents if d not in dropped for t, _ in d if t}
    assert set(lines) == kept and not held_out & kept
    vocabulary = set(synth_sentences.load_sentence_pool().vocabulary)
    assert stats["ngram_text_words"] > 10 * sum(len(s.text.split()) for s in synth_sentences.load_sentence_pool()
                                                .sentences)  # text without audio, most of it out of the vocabulary
    assert sum(not set(line.split()) <= vocabulary for line in lines) > 0.5 * len(lines)


def test_same_seed_same_corpus_other_seed_differs(corpus, tmp_path):
    out, _ = corpus
    again = tmp_path / "again"
    mc.make_corpus(again, hours=0.01, seed=0, jobs=1, engines=ENGINES)
    for split in SPLITS:
        assert read_split(again, split)["text"] == read_split(out, split)["text"]
        assert read_split(again, split)["utt2spk"] == read_split(out, split)["utt2spk"]
    assert (again / "utterances.jsonl").read_text() == (out / "utterances.jsonl").read_text()  # parameters
    for path in sorted((out / "wav" / "train").glob("*.wav"))[:5]:
        assert (again / "wav" / "train" / path.name).read_bytes() == path.read_bytes()

    other = tmp_path / "other"
    mc.make_corpus(other, hours=0.01, seed=1, jobs=2, engines=ENGINES)
    assert read_split(other, "train")["text"] != read_split(out, "train")["text"]


def test_failing_engine_is_counted_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setitem(synth_voices.ENGINE_BINARIES, "flite", str(tmp_path / "no-such-flite"))
    stats = mc.make_corpus(tmp_path / "c", hours=0.01, seed=0, jobs=2, engines=ENGINES)
    planned = [json.loads(line) for line in (tmp_path / "c" / "utterances.jsonl").read_text().splitlines()]
    flite = {u["utt_id"] for u in planned if u["engine"] == "flite"}
    assert flite and stats["failed_syntheses"] == len(flite)
    failed = (tmp_path / "c" / "failed.txt").read_text().splitlines()
    assert {line.split("\t")[0] for line in failed} == flite
    assert all("\tflite/" in line and "command not found" in line for line in failed)
    listed = set().union(*(read_split(tmp_path / "c", s)["text"] for s in SPLITS))
    assert listed and not listed & flite
    assert not any((tmp_path / "c" / "wav").rglob("flite_*.wav"))


def test_all_engines_failing_is_an_error(tmp_path, monkeypatch):
    for engine in ENGINES:
        monkeypatch.setitem(synth_voices.ENGINE_BINARIES, engine, str(tmp_path / f"no-such-{engine}"))
    with pytest.raises(RuntimeError, match="syntheses failed"):
        mc.make_corpus(tmp_path / "c", hours=0.01, seed=0, jobs=1, engines=ENGINES)
    assert (tmp_path / "c" / "failed.txt").read_text().count("\n") > 0
    assert not (tmp_path / "c" / "stats.json").exists()


def test_plan_sizes_and_regrouped_train_passages():
    pool = synth_sentences.load_sentence_pool()
    picker = synth_voices.VoicePicker(["espeak", "flite", "festival"])
    plan = mc.plan_corpus(pool, picker, 0.5, random.Random(0)).utterances
    counts = {s: sum(u.split == s for u in plan) for s in SPLITS}
    total = len(plan)
    assert 0.03 < counts["dev"] / total < 0.07 and 0.07 < counts["test"] / total < 0.11
    assert counts["test_unseen_voice"] == counts["test"]
    assert {u.voice.engine for u in plan if u.split == "test_unseen_voice"} == {"espeak", "flite", "festival"}
    assert 0.45 < sum(mc.estimate_seconds(u.passage, u.params) for u in plan) / 3600 < 0.55

    # 2.5 h needs more train utterances than the pool has train passages: the train sentences are regrouped.
    corpus_plan = mc.plan_corpus(pool, synth_voices.VoicePicker(["flite"]), 2.5, random.Random(0))
    plan = corpus_plan.utterances
    train = [u for u in plan if u.split == "train"]
    assert len({u.utt_id for u in plan}) == len(plan)
    first_round = {u.passage.sentence_indices for u in train}
    assert len(first_round) > 0.95 * len(train)  # new combinations, not the same passages again
    uses = collections.Counter(i for u in train for i in u.passage.sentence_indices)
    assert max(uses.values()) >= 2
    eval_sentences = {i for u in plan if u.split != "train" for i in u.passage.sentence_indices}
    assert not eval_sentences & set(uses)
    assert not eval_sentences & {i for p in corpus_plan.train_passages for i in p.sentence_indices}
    assert {u.passage for u in train} <= set(corpus_plan.train_passages)


def _pool(lengths, runs=()):
    """A pool of sentences of the given word counts: sentence i is "Wi Wi ...", its spoken form lower-case."""
    sentences = tuple(synth_sentences.Sentence(" ".join([f"W{i}"] * n), " ".join([f"w{i}"] * n))
                      for i, n in enumerate(lengths))
    return synth_sentences.SentencePool(sentences, tuple(runs), (), len(sentences))


def test_passages_keep_runs_in_order_and_use_every_sentence_once():
    rng = random.Random(0)
    lengths = [rng.randint(3, 9) for _ in range(300)]  # the real pool averages 6 words
    runs = [(10, 11, 12), (20, 21, 22, 23, 24)] + [(i, i + 1) for i in range(100, 200, 4)]
    pool = _pool(lengths, runs)
    units = synth_passages.passage_units(pool, range(300))
    assert (20, 21, 22) in units and (23, 24) in units  # a run longer than a passage is cut
    rng.shuffle(units)
    passages = synth_passages.form_passages(pool, units, rng)
    used = [i for p in passages for i in p.sentence_indices]
    assert sorted(used) == list(range(300))
    for run in [(10, 11, 12), (20, 21, 22), (23, 24)] + runs[2:]:
        holder = next(p.sentence_indices for p in passages if run[0] in p.sentence_indices)
        start = holder.index(run[0])
        assert holder[start:start + len(run)] == run
    words = [p.words for p in passages]
    assert all(1 <= len(p.sentence_indices) <= 3 for p in passages) and max(words) <= 30
    short = [p.sentence_indices for p in passages[:-1] if p.words < synth_passages.MIN_WORDS]
    assert all(len(p) == 3 and p in units for p in short)  # only the last, or a run of three short sentences
    assert 15 <= sum(words) / len(words) <= 20
    assert passages[0].spoken.count(".") == len(passages[0].sentence_indices)
    assert passages[0].text == " ".join(pool.sentences[i].text for i in passages[0].sentence_indices)


def test_spoken_sentences_close_with_a_stop():
    assert synth_passages.spoken_sentence("the dog barked") == "The dog barked."
    assert synth_passages.spoken_sentence("Where can I sign up?") == "Where can I sign up?"
    assert synth_passages.spoken_sentence("he said, twice,") == "He said, twice."
    pool = _pool([3, 4])
    assert synth_passages.make_passage(pool, [1, 0]).spoken == "W1 w1 w1 w1. W0 w0 w0."


def test_default_engines_are_fixed_with_hibari_only_when_importable(monkeypatch):
    monkeypatch.setattr(synth_voices.importlib.util, "find_spec", lambda name: None)
    assert synth_voices.default_engines() == ["espeak", "flite", "festival"]
    assert synth_voices.missing_engines(["espeak", "hibari"]) == ["hibari"]
    monkeypatch.setattr(synth_voices.importlib.util, "find_spec", lambda name: object())
    assert synth_voices.default_engines() == ["espeak", "flite", "festival", "hibari"]
    monkeypatch.setitem(synth_voices.ENGINE_BINARIES, "flite", "/nonexistent/flite")
    assert synth_voices.missing_engines(["espeak", "flite", "hibari"]) == ["flite"]


def test_speakable_filters_what_engines_would_not_read_verbatim():
    assert synth_sentences.speakable('"Sir, I exist!" -- he said (twice).') == "Sir, I exist!, he said twice."
    assert synth_sentences.speakable("a well-known fact") == "a well-known fact"
    for bad in ("It costs 5 dollars.", "NASA went to the moon.", "cats & dogs", "see http://x"):
        assert synth_sentences.speakable(bad) == "", bad
    found = synth_sentences.candidate_sentences(
        [["The cat sat.", "Hi there you!", "Go.", "I saw J. R. Smith", "the cat sat"]])
    assert [s.text for s in found.sentences] == ["HI THERE YOU", "THE CAT SAT"]
    assert found.runs == (("THE CAT SAT", "HI THERE YOU"),)  # "Go." (too short) ends the run


def test_vocabulary_keeps_only_sentences_of_frequent_words_and_splits_runs():
    cands = synth_sentences.candidate_sentences([
        ["the dog ran home", "the dog sat down", "the cat ran home", "a zebra ran home", "the dog ran home"],
        ["the dog ran home", "the dog ran home", "the dog ran home"]])
    pool = synth_sentences.restrict_to_vocabulary(cands, 4)  # THE RAN HOME DOG (ties alphabetical)
    assert [s.text for s in pool.sentences] == ["THE DOG RAN HOME"]
    assert pool.vocabulary == ("DOG", "HOME", "RAN", "THE") and pool.candidates == 4
    assert pool.runs == ()  # dropped and repeated sentences cut every run down to one sentence

    cands = synth_sentences.candidate_sentences([["Aa bb cc.", "Bb cc aa.", "Zz yy xx!", "Cc aa bb.", "Aa cc bb."],
                                                 ["Bb aa cc.", "Aa bb cc.", "Cc bb aa."]])
    pool = synth_sentences.restrict_to_vocabulary(cands, 3)
    texts = [s.text for s in pool.sentences]
    # Cut at the dropped ZZ sentence; the second document's run is cut at AA BB CC, already in the first one.
    assert [[texts[i] for i in run] for run in pool.runs] == [["AA BB CC", "BB CC AA"], ["CC AA BB", "AA CC BB"]]


def test_sources_are_parsed(tmp_path):
    (tmp_path / "data.noun").write_text('  1 licence "not this"\n'
                                        '0001 05 n 01 dog 0 | a canine; "the dog barked"; "dogs bark"  \n'
                                        '0002 05 n 01 cat 0 | a feline  \n')
    assert list(synth_sentences.wordnet_glosses(tmp_path)) == [["the dog barked", "dogs bark"]]
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    (fortunes / "wisdom").write_text("First one.  Second\none!\n\t\t-- Someone Famous\n%\nThird here.\n")
    (fortunes / "wisdom.dat").write_bytes(b"\x00\x01")
    assert list(synth_sentences.fortune_cookies(fortunes)) == [["First one.", "Second one!"], ["Third here."]]


@pytest.mark.parametrize("colour", ["white", "pink", "brown"])
def test_noise_has_the_asked_snr(colour):
    rng = np.random.default_rng(0)
    signal = np.sin(np.arange(16000) * 0.05)
    noise = synth_render.coloured_noise(signal, 12.0, colour, rng)
    snr = 10 * np.log10(np.mean(signal ** 2) / np.mean(noise ** 2))
    assert abs(snr - 12.0) < 0.01
