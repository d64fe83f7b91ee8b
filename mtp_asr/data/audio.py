"""Reading audio for `transcribe`: any format soundfile reads (wav, flac, ogg, mp3), else ffmpeg via Lhotse;
resampled to 16 kHz and down-mixed to mono."""
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

SAMPLE_RATE = 16000


def load_audio(path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """float32 mono samples at `sample_rate`; ValueError naming the file when it cannot be read or is empty."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist")
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (time, channels)
        samples = samples.T
    except (sf.LibsndfileError, RuntimeError):
        try:
            from lhotse import Recording

            rec = Recording.from_file(str(path))
            samples, rate = rec.load_audio().astype(np.float32), rec.sampling_rate
        except Exception as e:
            raise ValueError(f"cannot read audio file {path}: {e}") from None
    if samples.size == 0:
        raise ValueError(f"audio file {path} holds no samples")
    mono = torch.from_numpy(samples).mean(dim=0)
    if rate != sample_rate:
        mono = torchaudio.functional.resample(mono, rate, sample_rate)
    return mono.numpy()
