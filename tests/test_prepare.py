"""Corpus preparation: LibriSpeech and Kaldi layouts, every kind of bad input, the skip report, atomic output."""
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio
from click.testing import CliRunner
from lhotse import CutSet, load_manifest
from lhotse.cut import MixedCut

from mtp_asr.cli import main
from mtp_asr.data import PreparationError
from mtp_asr.data import synth
from mtp_asr.data.prepare import prepare_kaldi, prepare_librispeech


def read_report(out_dir: Path, split: str) -> str:
    return (out_dir / f"prepare-report-{split}.txt").read_text()


def skipped(report: str) -> dict:
    """{utt: reason} from the report's per-utterance lines."""
    lines = report.split("skipped utterances:\n")[1].split("warnings:\n")[0].splitlines()
    return {line.split()[0]: line.split()[1].rstrip(":") for line in lines}


# ----------------------------------------------------------------------------------------------------------------
# Clean corpora


def test_librispeech_parts_ids_text_and_speakers(librispeech_dir, tmp_path):
    out = tmp_path / "manifests"
    paths = prepare_librispeech(librispeech_dir.parent, out)  # the parent of LibriSpeech/ is accepted too
    assert sorted(paths) == ["dev-clean", "test-other"]
    assert paths["dev-clean"] == out / "cuts_dev-clean.jsonl.gz"
    cuts = load_manifest(paths["dev-clean"])
    assert sorted(cuts.ids) == ["174-50561-0000", "84-121123-0000", "84-121123-0001"]
    cut = cuts["84-121123-0001"]
    assert cut.duration == pytest.approx(0.75)
    assert cut.load_audio().shape == (1, 12000)
    (sup,) = cut.supervisions
    assert (sup.text, sup.speaker, sup.language) == ("BUT IN LESS THAN FIVE MINUTES", "84", "English")
    assert load_manifest(paths["test-other"])[0].supervisions[0].text == "THERE'S IRON THEY SAY IN ALL OUR BLOOD"
    assert "kept 3 utterances" in read_report(out, "dev-clean")


def test_librispeech_matches_lhotse_recipe(librispeech_dir, tmp_path):
    from lhotse.recipes import prepare_librispeech as lhotse_prepare

    ours = load_manifest(prepare_librispeech(librispeech_dir, tmp_path / "ours")["dev-clean"])
    theirs = lhotse_prepare(librispeech_dir, dataset_parts=["dev-clean"])["dev-clean"]
    for sup in theirs["supervisions"]:
        cut = ours[sup.id]
        assert cut.recording_id == sup.recording_id
        assert cut.recording.sources[0].source == theirs["recordings"][sup.recording_id].sources[0].source
        assert (cut.supervisions[0].speaker, cut.duration) == (sup.speaker, pytest.approx(sup.duration))
    assert len(ours) == len(theirs["supervisions"])


def test_kaldi_without_segments(kaldi_dir, tmp_path):
    out = tmp_path / "out"
    path = prepare_kaldi(kaldi_dir, out)
    assert path == out / "cuts_dev.jsonl.gz"  # split defaults to the directory's name
    cuts = load_manifest(path)
    assert sorted(cuts.ids) == ["spk1-utt1", "spk1-utt2", "spk2-utt1"]
    assert cuts["spk1-utt1"].supervisions[0].text == "HELLO WORLD"
    assert cuts["spk1-utt2"].supervisions[0].text == "IT'S A TEST"
    assert cuts["spk2-utt1"].supervisions[0].speaker == "spk2"
    assert cuts["spk2-utt1"].duration == pytest.approx(1.3)


def test_kaldi_without_utt2spk_uses_utterance_as_speaker(kaldi_writer, tmp_path):
    data = kaldi_writer(tmp_path / "d", {"u1": (0.5, "A B")}, speakers=False)
    cut = load_manifest(prepare_kaldi(data, tmp_path / "out", split="x"))[0]
    assert cut.supervisions[0].speaker == "u1"


def test_kaldi_with_segments(audio_writer, tmp_path):
    data = tmp_path / "seg"
    samples = audio_writer(data / "rec1.wav", 3.0)
    (data / "wav.scp").write_text(f"rec1 {data / 'rec1.wav'}\n")
    (data / "segments").write_text(
        "rec1-a rec1 0.50 1.25\n"
        "rec1-b rec1 2.00 -1\n"  # -1: to the end of the recording
        "rec1-c rec1 2.50 3.20\n"  # overshoots by 0.2 s: clipped, as Kaldi does
        "rec1-d rec1 2.00 9.00\n"  # overshoots by 6 s: rejected
        "rec1-e rec9 0.00 1.00\n"  # unknown recording
    )
    (data / "text").write_text("rec1-a one\nrec1-b two\nrec1-c three\nrec1-d four\nrec1-e five\n")
    (data / "utt2spk").write_text("".join(f"rec1-{x} spk\n" for x in "abcde"))
    out = tmp_path / "out"
    cuts = load_manifest(prepare_kaldi(data, out, split="seg"))
    assert sorted(cuts.ids) == ["rec1-a", "rec1-b", "rec1-c"]
    a = cuts["rec1-a"]
    assert (a.start, a.duration, a.recording_id) == (0.5, 0.75, "rec1")
    np.testing.assert_allclose(a.load_audio()[0], samples[8000:20000, 0], atol=1e-6)
    assert cuts["rec1-b"].duration == pytest.approx(1.0)
    assert cuts["rec1-c"].end == pytest.approx(3.0)
    reasons = skipped(read_report(out, "seg"))
    assert reasons == {"rec1-d": "bad-segment", "rec1-e": "no-audio-entry"}
    assert f"{data / 'segments'}:4: segment ends at 9.0 s" in read_report(out, "seg")


def test_kaldi_pipe_commands(kaldi_writer, tmp_path):
    data = kaldi_writer(tmp_path / "p", {"u1": (0.5, "piped"), "u2": (0.5, "broken pipe")})
    wav = data / "audio" / "u1.wav"
    (data / "wav.scp").write_text(f"u1 cat {wav} |\nu2 cat {data}/nowhere.wav |\n")
    out = tmp_path / "out"
    cuts = load_manifest(prepare_kaldi(data, out))
    assert list(cuts.ids) == ["u1"]
    assert cuts[0].recording.sources[0].type == "command"
    assert cuts[0].load_audio().shape == (1, 8000)
    report = read_report(out, "p")
    assert skipped(report) == {"u2": "unreadable-audio"}
    assert "nowhere.wav" in report  # the failing command's own message


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one good utterance, one bad one; the bad one is skipped with its reason and the file at fault named


def _missing_audio(data):
    (data / "audio" / "bad.wav").unlink()


def _random_bytes(data):
    (data / "audio" / "bad.wav").write_bytes(os.urandom(3000))


def _truncated_wav(data):
    path = data / "audio" / "bad.wav"
    path.write_bytes(path.read_bytes()[:5000])  # header intact, most of the samples gone


def _header_only_wav(data):
    path = data / "audio" / "bad.wav"
    path.write_bytes(path.read_bytes()[:30])


def _zero_length(data, audio_writer):
    audio_writer(data / "audio" / "bad.wav", 0.0)


def _empty_text(data):
    (data / "text").write_text("bad\ngood fine\n")


def _punctuation_only_text(data):
    (data / "text").write_text("bad ?!\ngood fine\n")


def _non_utf8_text(data):
    (data / "text").write_bytes(b"bad caf\xe9 au lait\ngood fine\n")


def _text_and_wav_scp_disagree(data):
    (data / "text").write_text("good fine\nghost nobody recorded this\n")  # no line for 'bad'


BAD_CASES = {
    "missing-audio": (_missing_audio, {"bad": "missing-audio"}, "bad.wav does not exist"),
    "random-bytes": (_random_bytes, {"bad": "unreadable-audio"}, "bad.wav"),
    "truncated-wav": (_truncated_wav, {"bad": "truncated-audio"}, "data chunk declares"),
    "header-only-wav": (_header_only_wav, {"bad": "unreadable-audio"}, "bad.wav"),
    "zero-length": (_zero_length, {"bad": "too-short-audio"}, "0 samples"),
    "empty-text": (_empty_text, {"bad": "empty-text"}, "text:1"),
    "punctuation-only-text": (_punctuation_only_text, {"bad": "empty-text"}, "text:1"),
    "non-utf8-text": (_non_utf8_text, {"bad": "non-utf8"}, "text:1"),
    "text-and-wav.scp-disagree": (
        _text_and_wav_scp_disagree, {"bad": "no-transcript", "ghost": "no-audio-entry"}, "wav.scp:1: bad is not in"
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_utterance_is_skipped_and_reported(case, kaldi_writer, audio_writer, tmp_path):
    spoil, expected, named = BAD_CASES[case]
    data = kaldi_writer(tmp_path / "d", {"good": (0.5, "fine"), "bad": (0.5, "words")})
    if spoil is _zero_length:
        spoil(data, audio_writer)
    else:
        spoil(data)
    out = tmp_path / "out"
    cuts = load_manifest(prepare_kaldi(data, out))
    assert list(cuts.ids) == ["good"]
    report = read_report(out, "d")
    assert skipped(report) == expected
    assert named in report
    for reason in set(expected.values()):
        assert f"  {reason} {list(expected.values()).count(reason)}\n" in report  # the count per reason


@pytest.mark.parametrize("placeholder", [0xFFFFFFFF, 0x7FFFF000])
def test_wav_streamed_without_a_length_is_kept(placeholder, kaldi_writer, tmp_path):
    """espeak-ng --stdout and sox writing to a pipe put a placeholder where the data chunk's length goes."""
    data = kaldi_writer(tmp_path / "d", {"u1": (0.5, "streamed")})
    path = data / "audio" / "u1.wav"
    raw = bytearray(path.read_bytes())
    at = raw.index(b"data") + 4
    raw[at:at + 4] = struct.pack("<I", placeholder)
    path.write_bytes(bytes(raw))
    cuts = load_manifest(prepare_kaldi(data, tmp_path / "out"))
    assert list(cuts.ids) == ["u1"] and cuts[0].duration == pytest.approx(0.5, abs=0.01)


def test_repeated_ids_keep_the_first_and_warn(kaldi_writer, tmp_path):
    data = kaldi_writer(tmp_path / "d", {"u1": (0.5, "first")})
    with open(data / "text", "a") as f:
        f.write("u1 second\n")
    out = tmp_path / "out"
    cut = load_manifest(prepare_kaldi(data, out))[0]
    assert cut.supervisions[0].text == "FIRST"
    assert f"u1 duplicate-id: {data / 'text'}:2 repeats {data / 'text'}:1" in read_report(out, "d")


def test_a_byte_order_mark_is_not_part_of_the_first_key(kaldi_writer, tmp_path):
    data = kaldi_writer(tmp_path / "d", {"u1": (0.5, "first"), "u2": (0.5, "second")})
    for name in ("text", "wav.scp"):
        (data / name).write_bytes(b"\xef\xbb\xbf" + (data / name).read_bytes())
    cuts = load_manifest(prepare_kaldi(data, tmp_path / "out"))
    assert sorted(cuts.ids) == ["u1", "u2"]


def test_librispeech_repeated_transcript_line_keeps_the_first(librispeech_dir, tmp_path):
    trans = librispeech_dir / "dev-clean" / "174" / "50561" / "174-50561.trans.txt"
    with open(trans, "a") as f:
        f.write("174-50561-0000 A SECOND TRANSCRIPT\n")
    out = tmp_path / "out"
    cuts = load_manifest(prepare_librispeech(librispeech_dir, out)["dev-clean"])
    assert [c.supervisions[0].text for c in cuts if c.id == "174-50561-0000"] == ["FOREVER"]
    assert f"174-50561-0000 duplicate-id: {trans}:2: 174-50561-0000 is listed again" in read_report(out, "dev-clean")


def test_truncated_flac_is_skipped(librispeech_dir, tmp_path):
    flac = librispeech_dir / "dev-clean" / "84" / "121123" / "84-121123-0001.flac"
    flac.write_bytes(flac.read_bytes()[: flac.stat().st_size // 2])
    out = tmp_path / "out"
    cuts = load_manifest(prepare_librispeech(librispeech_dir, out)["dev-clean"])
    assert "84-121123-0001" not in cuts.ids and len(cuts) == 2
    assert skipped(read_report(out, "dev-clean")) == {"84-121123-0001": "truncated-audio"}


def test_librispeech_bad_lines_are_skipped(librispeech_dir, tmp_path):
    trans = librispeech_dir / "dev-clean" / "84" / "121123" / "84-121123.trans.txt"
    trans.write_bytes(b"84-121123-0000 GO DO YOU HEAR\n84-121123-0001\n84-121123-0002 NO \xff AUDIO\n")
    orphan = trans.parent / "84-121123-0009.flac"
    orphan.write_bytes((trans.parent / "84-121123-0000.flac").read_bytes())
    out = tmp_path / "out"
    cuts = load_manifest(prepare_librispeech(librispeech_dir, out)["dev-clean"])
    assert sorted(cuts.ids) == ["174-50561-0000", "84-121123-0000"]
    report = read_report(out, "dev-clean")
    assert skipped(report) == {
        "84-121123-0001": "empty-text", "84-121123-0002": "non-utf8", "84-121123-0009": "no-transcript"
    }  # fmt: skip
    assert f"{trans}:3" in report and f"{orphan} has no line in {trans}" in report


def test_8khz_and_stereo_are_converted_and_warned(kaldi_writer, audio_writer, tmp_path):
    data = kaldi_writer(tmp_path / "d", {"narrow": (1.0, "eight k"), "stereo": (1.0, "two channels")})
    narrow = audio_writer(data / "audio" / "narrow.wav", 1.0, sample_rate=8000)
    both = audio_writer(data / "audio" / "stereo.wav", 1.0, sample_rate=8000, channels=2)
    out = tmp_path / "out"
    cuts = load_manifest(prepare_kaldi(data, out))
    assert sorted(cuts.ids) == ["narrow", "stereo"]
    expected = {
        "narrow": torchaudio.functional.resample(torch.from_numpy(narrow[:, 0]), 8000, 16000),
        "stereo": torchaudio.functional.resample(torch.from_numpy(both.mean(axis=1)), 8000, 16000),
    }
    for cut in cuts:
        assert cut.sampling_rate == 16000 and cut.num_samples == 16000
        assert len(cut.supervisions) == 1
        audio = cut.load_audio()
        assert audio.shape == (1, 16000)
        np.testing.assert_allclose(audio[0], expected[cut.id].numpy(), atol=2e-3)
    assert isinstance(cuts["stereo"], MixedCut)
    report = read_report(out, "d")
    assert "kept 2 utterances" in report and "skipped 0" in report
    assert "  resampled 2\n" in report and "  downmixed 1\n" in report


def test_nothing_usable_is_a_clean_failure(kaldi_writer, tmp_path):
    data = kaldi_writer(tmp_path / "d", {"a": (0.5, "x"), "b": (0.5, "y")})
    for wav in (data / "audio").iterdir():
        wav.write_bytes(b"not audio at all")
    out = tmp_path / "out"
    with pytest.raises(PreparationError, match="no usable utterance.*prepare-report-d.txt"):
        prepare_kaldi(data, out)
    assert not (out / "cuts_d.jsonl.gz").exists()
    assert skipped(read_report(out, "d")) == {"a": "unreadable-audio", "b": "unreadable-audio"}


def test_failed_write_leaves_no_partial_manifest(kaldi_dir, tmp_path, monkeypatch):
    def write_half_then_fail(self, path, *args, **kwargs):
        Path(path).write_bytes(b"\x1f\x8b half a manifest")
        raise KeyboardInterrupt

    monkeypatch.setattr(CutSet, "to_file", write_half_then_fail)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare_kaldi(kaldi_dir, out)
    assert not any(p.name.startswith((".cuts", "cuts")) for p in out.iterdir())


def test_missing_kaldi_files_and_bad_split_names(kaldi_dir, tmp_path):
    (kaldi_dir / "text").unlink()
    with pytest.raises(PreparationError, match="text is missing"):
        prepare_kaldi(kaldi_dir, tmp_path / "out")
    with pytest.raises(PreparationError, match="split name"):
        prepare_kaldi(kaldi_dir, tmp_path / "out", split="a/b")
    with pytest.raises(PreparationError, match="no LibriSpeech part"):
        prepare_librispeech(kaldi_dir, tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------------
# Command line and the synthetic corpus wiring


def test_cli_prepare_kaldi_and_error_message(kaldi_dir, tmp_path):
    runner = CliRunner()
    args = ["prepare", "kaldi", str(kaldi_dir), str(tmp_path / "out"), "--split", "dev2", "-j", "2"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert len(load_manifest(tmp_path / "out" / "cuts_dev2.jsonl.gz")) == 3
    (kaldi_dir / "wav.scp").unlink()
    result = runner.invoke(main, ["prepare", "kaldi", str(kaldi_dir), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "wav.scp is missing" in result.output and "Traceback" not in result.output


def test_cli_prepare_librispeech(librispeech_dir, tmp_path):
    args = ["prepare", "librispeech", str(librispeech_dir), str(tmp_path / "out"), "-j", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "cuts_dev-clean.jsonl.gz",
        "cuts_test-other.jsonl.gz",
        "prepare-report-dev-clean.txt",
        "prepare-report-test-other.txt",
    ]


FAKE_GENERATOR = '''
from pathlib import Path
import numpy as np, soundfile as sf

calls = []

def make_corpus(out_dir, hours, seed=0, jobs=2, engines=None, **options):
    calls.append(dict(out_dir=Path(out_dir), hours=hours, seed=seed, jobs=jobs, engines=engines, **options))
    for split in ("train", "dev", "test", "test_unseen_voice"):
        d = Path(out_dir) / split
        d.mkdir(parents=True)
        wav = d / "utt.wav"
        sf.write(wav, np.zeros(8000, dtype="float32"), 16000)
        (d / "wav.scp").write_text(f"{split}-utt {wav}\\n")
        (d / "text").write_text(f"{split}-utt words of {split}\\n")
        (d / "utt2spk").write_text(f"{split}-utt voice1\\n")
    (Path(out_dir) / "stats.json").write_text("{}")
    return {"hours": hours}
'''


@pytest.mark.parametrize("words", [None, 1200])
def test_prepare_synth_runs_generator_then_kaldi_preparation(tmp_path, monkeypatch, words):
    generator = tmp_path / "local" / "synth" / "make_corpus.py"
    generator.parent.mkdir(parents=True)
    generator.write_text(FAKE_GENERATOR)
    monkeypatch.setattr(synth, "generator_path", lambda: generator)
    loaded = []
    real_load = synth.load_generator

    def load_and_keep():
        loaded.append(real_load())
        return loaded[-1]

    monkeypatch.setattr(synth, "load_generator", load_and_keep)
    out = tmp_path / "synth"
    result = CliRunner().invoke(
        main, ["prepare", "synth", str(out), "--hours", "0.01", "--seed", "7", "-j", "1", "--engines", "espeak,flite"]
        + (["--words", str(words)] if words else [])
    )
    assert result.exit_code == 0, result.output
    calls = loaded[0].__globals__["calls"]
    # Without --words the generator keeps its own default vocabulary size.
    vocab = {"vocab_size": words} if words else {}
    assert calls == [dict(out_dir=out / "corpus", hours=0.01, seed=7, jobs=1, engines=["espeak", "flite"], **vocab)]
    for split in synth.SPLITS:
        (cut,) = load_manifest(out / f"cuts_{split}.jsonl.gz")
        assert cut.supervisions[0].text == "WORDS OF " + split.upper().replace("_", " ")
        assert cut.supervisions[0].speaker == "voice1"
        assert (out / f"prepare-report-{split}.txt").is_file()


def test_prepare_synth_without_generator_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "generator_path", lambda: tmp_path / "absent" / "make_corpus.py")
    with pytest.raises(PreparationError, match="absent/make_corpus.py is missing.*source checkout"):
        synth.prepare_synth(tmp_path / "s", hours=0.01)


@pytest.mark.skipif(not synth.generator_path().is_file(), reason="needs local/synth/make_corpus.py of the checkout")
def test_prepare_synth_with_the_real_generator(tmp_path):
    """The wiring against the real generator and TTS engines (espeak-ng, flite, festival): about 5 s."""
    paths = synth.prepare_synth(tmp_path, hours=0.01, seed=0, jobs=2)
    assert sorted(paths) == sorted(synth.SPLITS)
    for split, path in paths.items():
        cuts = load_manifest(path)
        assert len(cuts) > 0 and all(c.sampling_rate == 16000 and c.supervisions[0].text for c in cuts)
        assert "skipped 0" in read_report(tmp_path, split)
    assert (tmp_path / "corpus" / "lm_text.txt").is_file()
