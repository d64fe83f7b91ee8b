"""Worker side of the synthetic corpus: run a TTS engine, then sox and numpy effects, write 16 kHz 16-bit WAV.

One RenderBatch holds utterances of a single voice, so festival loads its voice once per batch (`festival -b`
is ~150x real time for diphone voices, against ~20x for one text2wave process per utterance). Every failure
(missing binary, engine error, empty audio) is returned as a message for its utterance, never raised, so one
bad engine cannot stop the corpus.
"""
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import soundfile as sf

from mtp_asr.utils import atomic_path

SAMPLE_RATE = 16000
MIN_SECONDS = 0.3  # shorter output than this is an engine failure, not speech
SILENCE_PEAK = 1e-3
ENGINE_TIMEOUT_S = 60.0  # per utterance; festival batches get this per utterance in the batch

Result = Tuple[str, Optional[float], Optional[str]]  # utt_id, seconds written, or the error


@dataclass(frozen=True)
class RenderJob:
    utt_id: str
    spoken: str
    params: dict  # from synth_voices.draw_params
    out_path: str


@dataclass(frozen=True)
class RenderBatch:
    engine: str
    binary: Optional[str]  # the executable (None for the in-process hibari engine)
    voice_name: str
    jobs: Tuple[RenderJob, ...]


def render_batch(batch: RenderBatch) -> List[Result]:
    with tempfile.TemporaryDirectory(prefix="synth-") as tmp:
        raw = _synthesize(batch, Path(tmp))
        results = []
        for job in batch.jobs:
            outcome = raw[job.utt_id]
            if not isinstance(outcome, Path):
                results.append((job.utt_id, None, outcome))
                continue
            try:
                seconds = _finish(outcome, job, batch)
            except (RuntimeError, OSError, ValueError) as e:
                results.append((job.utt_id, None, str(e)))
            else:
                results.append((job.utt_id, seconds, None))
        return results


def _synthesize(batch: RenderBatch, tmp: Path) -> Dict[str, object]:
    """utt_id -> the engine's raw WAV path, or an error message."""
    if batch.engine == "festival":
        return _festival(batch, tmp)
    out: Dict[str, object] = {}
    for i, job in enumerate(batch.jobs):
        path = tmp / f"{i}.wav"
        try:
            if batch.engine == "hibari":
                _hibari(job, batch.voice_name, path)
            else:
                _run(_command(batch, job, path), ENGINE_TIMEOUT_S)
            out[job.utt_id] = path if path.is_file() else f"{batch.engine} wrote no audio"
        except (RuntimeError, OSError, ImportError) as e:
            out[job.utt_id] = str(e)
    return out


def _command(batch: RenderBatch, job: RenderJob, path: Path) -> List[str]:
    p = job.params
    if batch.engine == "espeak":
        return [batch.binary, "-v", batch.voice_name, "-s", str(p["espeak_wpm"]),
                "-p", str(p["espeak_pitch"]), "-w", str(path), job.spoken]
    if batch.engine == "flite":
        return [batch.binary, "-voice", batch.voice_name, "--setf", f"duration_stretch={1 / p['rate']:.3f}",
                "-t", job.spoken, "-o", str(path)]
    raise ValueError(f"unknown engine {batch.engine!r}")


def _run(cmd: List[str], timeout: float) -> None:
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{cmd[0]} timed out after {timeout:.0f} s")
    except FileNotFoundError:
        raise RuntimeError(f"{cmd[0]}: command not found")
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {err[-1] if err else 'no message'}")


def _festival_native_rate(voice_name: str) -> bool:
    return not voice_name.endswith("_hts")  # HTS voices ignore Duration_Stretch: sox tempo does their rate


def _festival(batch: RenderBatch, tmp: Path) -> Dict[str, object]:
    """One `festival -b` run for the batch; each utterance is guarded so one error skips only that one."""
    lines = [f"(voice_{batch.voice_name})"]
    paths = {}
    for i, job in enumerate(batch.jobs):
        paths[job.utt_id] = path = tmp / f"{i}.wav"
        stretch = 1 / job.params["rate"] if _festival_native_rate(batch.voice_name) else 1.0
        text = job.spoken.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(
            f"(unwind-protect (begin (Parameter.set 'Duration_Stretch {stretch:.3f}) "
            f'(set! u (Utterance Text "{text}")) (utt.synth u) (utt.save.wave u "{path}" \'riff)) '
            f'(format stderr "utterance {job.utt_id} failed\\n"))'
        )
    script = tmp / "batch.scm"
    script.write_text("\n".join(lines) + "\n")
    try:
        _run([batch.binary, "-b", str(script)], ENGINE_TIMEOUT_S * len(batch.jobs))
        error = "festival wrote no audio"
    except RuntimeError as e:
        error = str(e)
    return {utt: (p if p.is_file() else error) for utt, p in paths.items()}


_HIBARI = {}


def _hibari(job: RenderJob, voice_name: str, path: Path) -> None:
    if voice_name not in _HIBARI:  # about 0.5 s to load: once per worker process
        from hibari import Hibari

        _HIBARI[voice_name] = Hibari(voice=voice_name, threads=1)
    tts = _HIBARI[voice_name]
    audio = tts(job.spoken, speed=job.params["rate"], seed=job.params["noise_seed"] % 2**31)
    sf.write(str(path), np.asarray(audio, dtype=np.float32), tts.sample_rate, subtype="FLOAT")


def _sox_effects(params: dict, batch: RenderBatch) -> List[str]:
    effects = []
    if params.get("pitch_cents"):
        effects += ["pitch", str(params["pitch_cents"])]
    tempo = params.get("tempo", 1.0)
    if batch.engine == "festival" and not _festival_native_rate(batch.voice_name):
        tempo *= params["rate"]
    if tempo != 1.0:
        effects += ["tempo", "-s", f"{tempo:.4f}"]
    if "reverb" in params:
        reverberance, room_scale = params["reverb"]
        effects += ["reverb", str(reverberance), "50", str(room_scale)]
    return effects


def _finish(raw: Path, job: RenderJob, batch: RenderBatch) -> float:
    """Resample to 16 kHz mono with the sox effects, add noise, set the level, write the WAV atomically."""
    cmd = ["sox", "-D", "-V1", str(raw), "-t", "raw", "-e", "floating-point", "-b", "32", "-r", str(SAMPLE_RATE),
           "-c", "1", "-"] + _sox_effects(job.params, batch)
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=ENGINE_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"sox exited with {proc.returncode}: {proc.stderr.decode(errors='replace').strip()}")
    audio = np.frombuffer(proc.stdout, dtype="<f4").astype(np.float64)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if audio.size < MIN_SECONDS * SAMPLE_RATE or peak < SILENCE_PEAK:
        raise RuntimeError(f"empty audio from {batch.engine} ({audio.size / SAMPLE_RATE:.2f} s, peak {peak:.1e})")
    rng = np.random.default_rng(job.params["noise_seed"])
    if "snr_db" in job.params:
        audio = audio + coloured_noise(audio, job.params["snr_db"], job.params["noise"], rng)
    audio *= 10 ** (job.params["peak_db"] / 20) / np.max(np.abs(audio))
    with atomic_path(job.out_path) as tmp:
        sf.write(str(tmp), audio, SAMPLE_RATE, subtype="PCM_16")
    return audio.size / SAMPLE_RATE


def coloured_noise(signal: np.ndarray, snr_db: float, colour: str, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise with a 1/f^beta power spectrum (white 0, pink 1, brown 2) at `snr_db` below the signal."""
    beta = {"white": 0.0, "pink": 1.0, "brown": 2.0}[colour]
    noise = rng.standard_normal(signal.size)
    if beta:
        spectrum = np.fft.rfft(noise)
        freqs = np.fft.rfftfreq(signal.size)
        freqs[0] = freqs[1] if signal.size > 1 else 1.0
        noise = np.fft.irfft(spectrum / freqs ** (beta / 2), n=signal.size)
    noise -= noise.mean()
    signal_power = float(np.mean(signal ** 2))
    return noise * np.sqrt(signal_power / 10 ** (snr_db / 10) / max(float(np.mean(noise ** 2)), 1e-20))
