"""Fixtures shared by the tests: tiny audio corpora written on the fly (Kaldi and LibriSpeech layouts), and a tiny
feature corpus with an untrained two-head model for the decoding-option tests."""
import os
from pathlib import Path

# As the CLI does (see mtp_asr/cli/__init__.py): no spinning OpenMP threads when tests run beside other processes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import soundfile as sf


def write_audio(path: Path, seconds: float, sample_rate: int = 16000, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Write a tone with some noise (format from the suffix: .wav is 16-bit PCM, .flac); return the samples."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    tone = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t)
    samples = np.stack([tone + 0.05 * rng.standard_normal(n) for _ in range(channels)], axis=1).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples if channels > 1 else samples[:, 0], sample_rate, subtype="PCM_16")
    return sf.read(path, dtype="float32", always_2d=True)[0]


def write_kaldi_dir(data_dir: Path, utterances: dict, speakers: bool = True) -> Path:
    """utterances: {utt_id: (seconds, text)} -> audio under data_dir/audio plus wav.scp, text (and utt2spk)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    wav_lines, text_lines, spk_lines = [], [], []
    for i, (utt, (seconds, text)) in enumerate(sorted(utterances.items())):
        path = data_dir / "audio" / f"{utt}.wav"
        write_audio(path, seconds, seed=i)
        wav_lines.append(f"{utt} {path}")
        text_lines.append(f"{utt} {text}")
        spk_lines.append(f"{utt} {utt.split('-')[0]}")
    (data_dir / "wav.scp").write_text("\n".join(wav_lines) + "\n")
    (data_dir / "text").write_text("\n".join(text_lines) + "\n")
    if speakers:
        (data_dir / "utt2spk").write_text("\n".join(spk_lines) + "\n")
    return data_dir


@pytest.fixture
def kaldi_dir(tmp_path) -> Path:
    """A clean 3-utterance Kaldi data dir named 'dev' (speakers spk1, spk2)."""
    return write_kaldi_dir(
        tmp_path / "dev",
        {
            "spk1-utt1": (1.0, "Hello, world!"),
            "spk1-utt2": (0.7, "it's a test"),
            "spk2-utt1": (1.3, "THE QUICK BROWN FOX"),
        },
    )


@pytest.fixture
def librispeech_dir(tmp_path) -> Path:
    """<tmp>/LibriSpeech/{dev-clean,test-other}/<spk>/<chapter>/ flac files + *.trans.txt, as distributed."""
    root = tmp_path / "LibriSpeech"
    layout = {
        "dev-clean": {
            ("84", "121123"): ["GO DO YOU HEAR", "BUT IN LESS THAN FIVE MINUTES"],
            ("174", "50561"): ["FOREVER"],
        },
        "test-other": {("1688", "142285"): ["THERE'S IRON THEY SAY IN ALL OUR BLOOD"]},
    }
    seed = 0
    for part, chapters in layout.items():
        for (spk, chapter), texts in chapters.items():
            chapter_dir = root / part / spk / chapter
            lines = []
            for i, text in enumerate(texts):
                utt = f"{spk}-{chapter}-{i:04d}"
                write_audio(chapter_dir / f"{utt}.flac", 0.5 + 0.25 * i, seed=seed)
                seed += 1
                lines.append(f"{utt} {text}")
            (chapter_dir / f"{spk}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def audio_writer():
    """The `write_audio` helper, for tests that build their own corpora."""
    return write_audio


@pytest.fixture
def kaldi_writer():
    """The `write_kaldi_dir` helper, for tests that build their own data dirs."""
    return write_kaldi_dir


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """A feature corpus of 4 training and 4 validation cuts with its tokenizer (`train_fixtures.make_corpus`)."""
    from train_fixtures import make_corpus

    return make_corpus(tmp_path_factory.mktemp("corpus"), n_train=4, n_valid=4)


@pytest.fixture(scope="module")
def small_checkpoint(small_corpus, tmp_path_factory):
    """An untrained Speech-LLaMA checkpoint with 2 heads over `small_corpus`'s tokenizer."""
    from model_fixtures import speech_checkpoint

    return speech_checkpoint(tmp_path_factory.mktemp("model") / "model.pt", small_corpus["tokenizer"], num_heads=2)
