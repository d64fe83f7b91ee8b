"""The synthetic demo corpus generator (local/synth): formats, splits, LM text, determinism, engine failures."""
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
import synth_render  # noqa: E402  (make_corpus put local/synth on sys.path)
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


def test_kaldi_dirs_and_wav_format(corpus):
    out, stats = corpus
    assert json.loads((out / "stats.json").read_text()) == stats
    for split in SPLITS:
        for name in ("wav.scp", "text", "utt2spk"):
            ids = [row[0] for row in read_kaldi(out / split / name)]
            assert ids == sorted(ids) and len(ids) == len(set(ids)), f"{split}/{name} not sorted/unique"
        data = read_split(out, split)
        assert data["wav.scp"].keys() == data["text"].keys() == data["utt2spk"].keys()
        assert len(data["text"]) == stats["splits"][split]["utterances"] >= 3
        for utt, path in data["wav.scp"].items():
            path = Path(path)
            assert path.is_absolute() and path.parent == out.resolve() / "wav" / split
            info = sf.info(str(path))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert info.duration > 0.3
            assert utt.startswith(data["utt2spk"][utt] + "-")
        for text in data["text"].values():
            assert text == normalize_text(text) and 3 <= len(text.split()) <= 16
    assert stats["failed_syntheses"] == 0 and (out / "failed.txt").read_text() == ""
    assert stats["utterances"] == sum(s["utterances"] for s in stats["splits"].values())
    assert 0.005 < stats["hours"] < 0.03 and stats["hours_asked"] == 0.01
    assert 100 < stats["vocabulary_size"] <= synth_sentences.VOCAB_SIZE


def test_splits_disjoint_and_unseen_voices_held_out(corpus):
    out, _ = corpus
    data = {split: read_split(out, split) for split in SPLITS}
    sentences = {split: set(d["text"].values()) for split, d in data.items()}
    voices = {split: set(d["utt2spk"].values()) for split, d in data.items()}
    assert not sentences["train"] & sentences["dev"]
    assert not sentences["train"] & sentences["test"]
    assert not sentences["dev"] & sentences["test"]
    assert sentences["test_unseen_voice"] == sentences["test"]
    assert not voices["test_unseen_voice"] & (voices["train"] | voices["dev"] | voices["test"])
    held_out = {v.voice_id for v in synth_voices.all_voices() if v.held_out}
    assert voices["test_unseen_voice"] <= held_out
    assert not (voices["train"] | voices["dev"]) & held_out


def test_lm_text_excludes_dev_and_test(corpus):
    out, stats = corpus
    lm = (out / "lm_text.txt").read_text().splitlines()
    assert len(lm) == len(set(lm)) == stats["lm_text_sentences"]
    assert all(line == normalize_text(line) for line in lm)
    lm = set(lm)
    for split in ("dev", "test", "test_unseen_voice"):
        assert not lm & set(read_split(out, split)["text"].values()), f"{split} sentence in lm_text.txt"
    assert set(read_split(out, "train")["text"].values()) <= lm
    assert len(lm) > 10 * stats["splits"]["train"]["utterances"]  # the unspoken sentences are there too


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


def test_plan_sizes_and_reuse_with_other_voices():
    pool = synth_sentences.load_sentence_pool()
    picker = synth_voices.VoicePicker(["espeak", "flite", "festival"])
    plan = mc.plan_corpus(pool, picker, 0.5, random.Random(0))
    counts = {s: sum(u.split == s for u in plan) for s in SPLITS}
    total = len(plan)
    assert 0.03 < counts["dev"] / total < 0.07 and 0.07 < counts["test"] / total < 0.11
    assert counts["test_unseen_voice"] == counts["test"]
    assert {u.voice.engine for u in plan if u.split == "test_unseen_voice"} == {"espeak", "flite", "festival"}
    assert 0.45 < sum(mc.estimate_seconds(u.sentence, u.params) for u in plan) / 3600 < 0.55

    # Flite alone has 4 seen voices: once every train sentence is spoken, sentences repeat with new voices.
    flite = synth_voices.VoicePicker(["flite"])
    plan = mc.plan_corpus(pool, flite, 2.5, random.Random(0))
    train = [u for u in plan if u.split == "train"]
    assert len({u.utt_id for u in plan}) == len(plan)
    assert len(train) > len({u.sentence_index for u in train})
    eval_sentences = {u.sentence_index for u in plan if u.split != "train"}
    assert not eval_sentences & {u.sentence_index for u in train}


def test_speakable_filters_what_engines_would_not_read_verbatim():
    assert synth_sentences.speakable('"Sir, I exist!" -- he said (twice).') == "Sir, I exist!, he said twice."
    assert synth_sentences.speakable("a well-known fact") == "a well-known fact"
    for bad in ("It costs 5 dollars.", "NASA went to the moon.", "cats & dogs", "see http://x"):
        assert synth_sentences.speakable(bad) == "", bad
    found = synth_sentences.candidate_sentences(
        ["The cat sat.", "the cat sat", "Go.", "I saw J. R. Smith", "Hi there you!"])
    assert [s.text for s in found] == ["HI THERE YOU", "THE CAT SAT"]


def test_vocabulary_keeps_only_sentences_of_frequent_words():
    cands = synth_sentences.candidate_sentences(
        ["the dog ran home", "the dog sat down", "the cat ran home", "a zebra ran home"])
    pool = synth_sentences.restrict_to_vocabulary(cands, 4)  # THE RAN HOME DOG (ties alphabetical)
    assert [s.text for s in pool.sentences] == ["THE DOG RAN HOME"]
    assert pool.vocabulary == ("DOG", "HOME", "RAN", "THE") and pool.candidates == 4


def test_sources_are_parsed(tmp_path):
    (tmp_path / "data.noun").write_text('  1 licence "not this"\n'
                                        '0001 05 n 01 dog 0 | a canine; "the dog barked"; "dogs bark"  \n')
    assert list(synth_sentences.wordnet_examples(tmp_path)) == ["the dog barked", "dogs bark"]
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    (fortunes / "wisdom").write_text("First one.  Second\none!\n\t\t-- Someone Famous\n%\nThird here.\n")
    (fortunes / "wisdom.dat").write_bytes(b"\x00\x01")
    assert list(synth_sentences.fortune_sentences(fortunes)) == ["First one.", "Second one!", "Third here."]


@pytest.mark.parametrize("colour", ["white", "pink", "brown"])
def test_noise_has_the_asked_snr(colour):
    rng = np.random.default_rng(0)
    signal = np.sin(np.arange(16000) * 0.05)
    noise = synth_render.coloured_noise(signal, 12.0, colour, rng)
    snr = 10 * np.log10(np.mean(signal ** 2) / np.mean(noise ** 2))
    assert abs(snr - 12.0) < 0.01
