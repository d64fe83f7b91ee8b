"""Fbank: Lhotse's extractor and lilcom storage against torchaudio's Kaldi-compatible fbank, splits, jobs, failures."""
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from click.testing import CliRunner
from lhotse import Fbank, load_manifest

from mtp_asr.cli import main
from mtp_asr.data.fbank import compute_fbank, fbank_extractor
from mtp_asr.data.prepare import prepare_kaldi

# LilcomChunkyWriter keeps log-energies on a grid of 2**-5, so a stored value is off by at most half a step;
# the extractors themselves agree to ~3e-5.
LILCOM_ATOL = 2**-6 + 1e-4


def kaldi_fbank(samples: np.ndarray) -> np.ndarray:
    """torchaudio's Kaldi fbank with the configuration Lhotse's Fbank uses (no dither, snip_edges=False, ...)."""
    return torchaudio.compliance.kaldi.fbank(
        torch.as_tensor(samples, dtype=torch.float32).reshape(1, -1),
        sample_frequency=16000,
        num_mel_bins=80,
        frame_length=25.0,
        frame_shift=10.0,
        dither=0.0,
        snip_edges=False,
        energy_floor=1e-10,
        window_type="povey",
        preemphasis_coefficient=0.97,
        remove_dc_offset=True,
        round_to_power_of_two=True,
        low_freq=20.0,
        high_freq=-400.0,
        use_energy=False,
        raw_energy=True,
    ).numpy()


@pytest.fixture
def prepared(kaldi_dir, tmp_path):
    out = tmp_path / "manifests"
    prepare_kaldi(kaldi_dir, out)
    return out


def test_features_match_torchaudio_kaldi_fbank(prepared, kaldi_dir, tmp_path):
    paths = compute_fbank(prepared, tmp_path / "fbank", jobs=1)
    assert paths == {"dev": tmp_path / "fbank" / "cuts_dev.jsonl.gz"}
    cuts = load_manifest(paths["dev"])
    assert len(cuts) == 3
    for cut in cuts:
        feats = cut.load_features()
        samples, rate = sf.read(kaldi_dir / "audio" / f"{cut.id}.wav", dtype="float32")
        expected = kaldi_fbank(samples)
        assert feats.shape == expected.shape == (round(cut.duration / 0.01), 80)
        np.testing.assert_allclose(feats, expected, rtol=0, atol=LILCOM_ATOL)
        assert cut.features.storage_path.startswith(str(tmp_path / "fbank" / "feats_dev"))
        assert cut.features.storage_type == "lilcom_chunky"
    # Before compression the two implementations agree much more closely: the configs really match.
    samples, _ = sf.read(kaldi_dir / "audio" / "spk1-utt1.wav", dtype="float32")
    np.testing.assert_allclose(fbank_extractor().extract(samples, 16000), kaldi_fbank(samples), rtol=0, atol=1e-3)


def test_features_of_resampled_stereo_audio(kaldi_writer, audio_writer, tmp_path):
    data = kaldi_writer(tmp_path / "d", {"stereo8k": (1.0, "two channels")})
    audio_writer(data / "audio" / "stereo8k.wav", 1.0, sample_rate=8000, channels=2)
    prepare_kaldi(data, tmp_path / "m")
    prepared = load_manifest(tmp_path / "m" / "cuts_d.jsonl.gz")[0]
    cut = load_manifest(compute_fbank(tmp_path / "m", tmp_path / "f")["d"])[0]
    assert cut.supervisions[0].text == "TWO CHANNELS"
    np.testing.assert_allclose(cut.load_features(), kaldi_fbank(prepared.load_audio()[0]), rtol=0, atol=LILCOM_ATOL)


def test_parallel_jobs_give_the_serial_result(prepared, tmp_path):
    serial = load_manifest(compute_fbank(prepared, tmp_path / "one", jobs=1)["dev"])
    parallel = load_manifest(compute_fbank(prepared, tmp_path / "two", jobs=2)["dev"])
    assert list(parallel.ids) == list(serial.ids)
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a.load_features(), b.load_features())
    assert len(list((tmp_path / "two" / "feats_dev").iterdir())) == 3  # one storage file per chunk


def test_cli_splits_and_errors(prepared, kaldi_dir, tmp_path):
    prepare_kaldi(kaldi_dir, prepared, split="other")
    runner = CliRunner()
    result = runner.invoke(main, ["compute-fbank", str(prepared), str(tmp_path / "f"), "--splits", "other", "-j", "1"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["cuts_other.jsonl.gz", "feats_other"]

    result = runner.invoke(main, ["compute-fbank", str(prepared), str(tmp_path / "f"), "--splits", "other,nope"])
    assert result.exit_code == 1 and "no manifest for split(s) nope" in result.output

    result = runner.invoke(main, ["compute-fbank", str(prepared), str(prepared)])
    assert result.exit_code == 1 and "OUT_DIR must differ from IN_DIR" in result.output
    assert load_manifest(prepared / "cuts_dev.jsonl.gz")[0].has_recording  # the input is untouched


def test_a_failed_recompute_keeps_the_old_features(prepared, tmp_path, monkeypatch):
    out = tmp_path / "f"
    compute_fbank(prepared, out)
    before = {c.id: c.load_features() for c in load_manifest(out / "cuts_dev.jsonl.gz")}

    def crash(self, *args, **kwargs):
        raise RuntimeError("disk full")

    real = Fbank.extract
    monkeypatch.setattr(Fbank, "extract", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        compute_fbank(prepared, out)
    # The old manifest and the features it points at are untouched; the new directory is gone.
    assert sorted(p.name for p in out.iterdir()) == ["cuts_dev.jsonl.gz", "feats_dev"]
    after = {c.id: c.load_features() for c in load_manifest(out / "cuts_dev.jsonl.gz")}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    # A recompute that succeeds replaces both, pointing at the final directory, and leaves no temporary one.
    monkeypatch.setattr(Fbank, "extract", real)
    cuts = load_manifest(compute_fbank(prepared, out)["dev"])
    assert sorted(p.name for p in out.iterdir()) == ["cuts_dev.jsonl.gz", "feats_dev"]
    assert all(Path(c.features.storage_path).parent == out / "feats_dev" for c in cuts)
    assert all(np.array_equal(before[c.id], c.load_features()) for c in cuts)


def test_cut_whose_audio_vanished_is_named(prepared, kaldi_dir, tmp_path, caplog):
    (kaldi_dir / "audio" / "spk1-utt2.wav").unlink()
    with caplog.at_level(logging.WARNING, logger="mtp_asr"):
        cuts = load_manifest(compute_fbank(prepared, tmp_path / "f")["dev"])
    assert sorted(cuts.ids) == ["spk1-utt1", "spk2-utt1"]
    assert "spk1-utt2" in caplog.text and "could not load audio" in caplog.text



def test_segments_of_a_longer_recording(tmp_path):
    """Cuts from a Kaldi `segments` file (start > 0 inside one recording) get the fbank of their own audio slice."""
    data = tmp_path / "seg"
    data.mkdir()
    # A chirp (100 Hz -> 4 kHz) with a swelling level over noise: every stretch of the recording sounds different,
    # so features taken at a wrong offset cannot pass for the right ones.
    t = np.arange(3 * 16000) / 16000
    rng = np.random.default_rng(0)
    chirp = np.sin(2 * np.pi * (100 * t + 650 * t ** 2)) * (0.05 + 0.3 * np.abs(np.sin(2 * np.pi * 0.7 * t)))
    sf.write(data / "rec1.wav", chirp + 0.01 * rng.standard_normal(len(t)), 16000, subtype="PCM_16")
    samples, _ = sf.read(data / "rec1.wav", dtype="float32")
    (data / "wav.scp").write_text(f"rec1 {data / 'rec1.wav'}\n")
    # (start, end) in seconds; b runs to the end of the recording (-1), c overshoots it by 0.15 s and is clipped.
    segments = {"rec1-a": (0.5, 1.25), "rec1-b": (2.0, 3.0), "rec1-c": (2.63, 3.0), "rec1-d": (0.0, 0.4)}
    (data / "segments").write_text("rec1-a rec1 0.50 1.25\nrec1-b rec1 2.00 -1\nrec1-c rec1 2.63 3.15\n"
                                   "rec1-d rec1 0.00 0.40\n")
    (data / "text").write_text("rec1-a one\nrec1-b two\nrec1-c three\nrec1-d four\n")
    (data / "utt2spk").write_text("".join(f"{utt} spk\n" for utt in segments))
    prepare_kaldi(data, tmp_path / "m", split="seg")
    cuts = load_manifest(compute_fbank(tmp_path / "m", tmp_path / "f", jobs=1)["seg"])
    assert sorted(cuts.ids) == sorted(segments)
    whole = kaldi_fbank(samples)  # the full recording's features: frame t covers 10 t - 7.5 ms to 10 t + 17.5 ms
    assert whole.shape == (300, 80)
    for cut in cuts:
        start, end = segments[cut.id]
        assert (cut.start, cut.end, cut.recording_id) == (pytest.approx(start), pytest.approx(end), "rec1")
        feats = cut.load_features()
        frames = round((end - start) / 0.01)
        assert feats.shape == (frames, 80) and cut.num_frames == frames
        expected = kaldi_fbank(samples[round(start * 16000):round(end * 16000)])
        assert expected.shape == feats.shape
        np.testing.assert_allclose(feats, expected, rtol=0, atol=LILCOM_ATOL)
        # Away from the segment's edges (where snip_edges=False pads by reflection) its frames are those of the
        # full recording from the segment's start on, when that start falls on the 10 ms frame grid.
        if round(start * 100) == start * 100:
            offset = round(start * 100)
            np.testing.assert_allclose(feats[2:-2], whole[offset + 2:offset + frames - 2], rtol=0, atol=LILCOM_ATOL)
        if start > 0:  # the same number of frames from the recording's start would be far off
            assert np.abs(feats - whole[:frames]).max() > 1.0
