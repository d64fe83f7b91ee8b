"""Corpus preparation: LibriSpeech directories and Kaldi data dirs -> validated Lhotse CutSets.

Both inputs are first read into `Utterance` records, then share one checking path: every audio source is probed
(exists, decodes to its declared end, long enough), audio at another rate than 16 kHz or with several channels
is converted lazily with Lhotse cut transforms (counted as a warning), each cut is validated with `lhotse.validate`,
and whatever cannot be used is skipped and listed in `OUT_DIR/prepare-report-<split>.txt`. Manifests are written
atomically.

Audio paths are stored as given: relative paths resolve against the current directory, as in Kaldi recipes.
"""
import io
import re
import struct
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from lhotse import CutSet, MonoCut, Recording, SupervisionSegment, validate
from lhotse.audio import AudioSource
from lhotse.cut import Cut, MixedCut, MixTrack
from lhotse.recipes.librispeech import LIBRISPEECH, MINI_LIBRISPEECH
from lhotse.utils import fastcopy

from mtp_asr.data import PreparationError
from mtp_asr.text import normalize_text
from mtp_asr.utils import Progress, atomic_path, atomic_write_text, logger

TARGET_SAMPLE_RATE = 16000
# One 25 ms analysis window: shorter audio has no complete fbank frame.
MIN_DURATION = 0.025
# As Kaldi's extract-segments: segment ends past the audio by less than this are clipped, beyond it rejected.
MAX_SEGMENT_OVERSHOOT = 0.5
# The tail read that proves a file decodes to its declared length (catches truncated flac/ogg).
TAIL_CHECK_SECONDS = 0.05


class AudioProblem(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Utterance:
    """One transcribed stretch of audio as the corpus files describe it, before its audio is checked."""

    id: str
    recording_id: str
    audio: str  # a file path, or a Kaldi pipe: a shell command ending in "|"
    text: str  # already normalised
    speaker: str
    origin: str  # "file:line" naming the utterance's audio (Kaldi: segments or wav.scp; LibriSpeech: transcript)
    start: float = 0.0
    end: Optional[float] = None  # None: to the end of the recording
    language: Optional[str] = None


class Report:
    """What a preparation skipped or changed, per utterance; written next to the manifest."""

    def __init__(self, split: str, source: Path):
        self.split, self.source = split, source
        self.skipped: Dict[str, Tuple[str, str]] = {}
        self.warnings: List[Tuple[str, str, str]] = []

    def skip(self, utt_id: str, reason: str, detail: str) -> None:
        # The first reason wins: a line dropped for bad bytes must not reappear as "no transcript".
        if utt_id not in self.skipped:
            self.skipped[utt_id] = (reason, detail)

    def warn(self, utt_id: str, reason: str, detail: str) -> None:
        self.warnings.append((utt_id, reason, detail))

    def render(self, kept: int, hours: float) -> str:
        lines = [
            f"# preparation report for split '{self.split}' from {self.source}",
            f"kept {kept} utterances ({hours:.3f} h), skipped {len(self.skipped)}, warnings {len(self.warnings)}",
        ]
        for title, counts in (
            ("skipped", Counter(reason for reason, _ in self.skipped.values())),
            ("warnings", Counter(reason for _, reason, _ in self.warnings)),
        ):
            lines.append(f"{title} by reason:")
            lines += [f"  {reason} {n}" for reason, n in sorted(counts.items())] or ["  none"]
        lines.append("skipped utterances:")
        lines += [f"  {utt} {reason}: {detail}" for utt, (reason, detail) in sorted(self.skipped.items())]
        lines.append("warnings:")
        lines += [f"  {utt} {reason}: {detail}" for utt, reason, detail in self.warnings]
        return "\n".join(lines) + "\n"


def manifest_path(out_dir: Path, split: str) -> Path:
    return Path(out_dir) / f"cuts_{split}.jsonl.gz"


def report_path(out_dir: Path, split: str) -> Path:
    return Path(out_dir) / f"prepare-report-{split}.txt"


# ---------------------------------------------------------------------------------------------------------------
# Reading corpus files


def read_lines(path: Path, report: Report):
    """Yield (origin, key, rest) per non-blank line; lines that are not UTF-8 are skipped and reported."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            origin = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark is not part of a key
            except UnicodeDecodeError as e:
                key = raw.split(maxsplit=1)[0].decode("utf-8", "replace") if raw.strip() else f"<{origin}>"
                report.skip(key, "non-utf8", f"{origin}: byte {e.start} is not UTF-8")
                continue
            parts = line.strip().split(maxsplit=1)
            if parts:
                yield origin, parts[0], parts[1] if len(parts) > 1 else ""


def read_table(path: Path, report: Report) -> Dict[str, Tuple[str, str]]:
    """A Kaldi table (key, then the rest of the line) as {key: (value, origin)}; repeated keys keep the first."""
    table: Dict[str, Tuple[str, str]] = {}
    for origin, key, value in read_lines(path, report):
        if key in table:
            report.warn(key, "duplicate-id", f"{origin} repeats {table[key][1]}; the first is kept")
            continue
        table[key] = (value, origin)
    return table


def normalized_transcript(utt_id: str, raw: str, origin: str, report: Report) -> Optional[str]:
    text = normalize_text(raw)
    if not text:
        report.skip(utt_id, "empty-text", f"{origin}: transcript {raw!r} is empty after normalisation")
        return None
    return text


def kaldi_utterances(data_dir: Path, report: Report) -> List[Utterance]:
    """wav.scp + text (+ utt2spk, + segments) -> utterances, reporting ids missing from either side."""
    for name in ("wav.scp", "text"):
        if not (data_dir / name).is_file():
            raise PreparationError(f"{data_dir / name} is missing: a Kaldi data dir needs wav.scp and text")
    wavs = read_table(data_dir / "wav.scp", report)
    texts = read_table(data_dir / "text", report)
    speakers = read_table(data_dir / "utt2spk", report) if (data_dir / "utt2spk").is_file() else None
    segments = read_table(data_dir / "segments", report) if (data_dir / "segments").is_file() else None

    # Without a segments file every wav.scp entry is one utterance spanning its whole recording.
    spans: Dict[str, Tuple[str, float, Optional[float], str]] = {}
    if segments is None:
        spans = {utt: (utt, 0.0, None, origin) for utt, (_, origin) in wavs.items()}
    else:
        for utt, (value, origin) in segments.items():
            fields = value.split()
            try:
                rec, start, end = fields[0], float(fields[1]), float(fields[2])
            except (IndexError, ValueError):
                report.skip(utt, "bad-segment", f"{origin}: expected '<utt> <recording> <start> <end>'")
                continue
            if rec not in wavs:
                report.skip(utt, "no-audio-entry", f"{origin}: recording {rec} is not in {data_dir / 'wav.scp'}")
                continue
            if start < 0 or (end != -1 and end <= start):
                report.skip(utt, "bad-segment", f"{origin}: start {start} / end {end} do not make a segment")
                continue
            spans[utt] = (rec, start, None if end == -1 else end, origin)

    utterances = []
    for utt, (raw, origin) in texts.items():
        if utt not in spans:
            where = "segments" if segments is not None else "wav.scp"
            report.skip(utt, "no-audio-entry", f"{origin}: {utt} has a transcript but no entry in {data_dir / where}")
            continue
        if speakers is not None and utt not in speakers:
            report.skip(utt, "no-speaker", f"{origin}: {utt} is not in {data_dir / 'utt2spk'}")
            continue
        text = normalized_transcript(utt, raw, origin, report)
        if text is None:
            continue
        # Later problems concern the audio or the segment: point at that line rather than the transcript.
        rec, start, end, span_origin = spans[utt]
        speaker = speakers[utt][0].split()[0] if speakers is not None and speakers[utt][0] else utt
        audio = wavs[rec][0]
        if not audio:
            report.skip(utt, "no-audio-entry", f"{wavs[rec][1]}: recording {rec} has no path or command")
            continue
        utterances.append(Utterance(utt, rec, audio, text, speaker, span_origin, start, end))
    for utt, (_, _, _, origin) in spans.items():
        if utt not in texts:
            report.skip(utt, "no-transcript", f"{origin}: {utt} is not in {data_dir / 'text'}")
    return utterances


def librispeech_parts(corpus_dir: Path) -> Tuple[Path, List[str]]:
    """The standard LibriSpeech parts present in corpus_dir (or in corpus_dir/LibriSpeech)."""
    known = list(LIBRISPEECH) + list(MINI_LIBRISPEECH)
    for root in (corpus_dir, corpus_dir / "LibriSpeech"):
        parts = [p for p in known if (root / p).is_dir()]
        if parts:
            return root, parts
    raise PreparationError(
        f"no LibriSpeech part ({', '.join(known)}) found in {corpus_dir} or {corpus_dir / 'LibriSpeech'}"
    )


def librispeech_utterances(part_dir: Path, report: Report) -> List[Utterance]:
    """<part>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt lines -> utterances (Lhotse's recipe layout and ids)."""
    utterances = []
    for trans in sorted(part_dir.rglob("*.trans.txt")):
        listed = set()
        for origin, utt, raw in read_lines(trans, report):
            if utt in listed:
                report.warn(utt, "duplicate-id", f"{origin}: {utt} is listed again; the first line is kept")
                continue
            listed.add(utt)
            text = normalized_transcript(utt, raw, origin, report)
            if text is None:
                continue
            audio = trans.parent / f"{utt}.flac"
            utterances.append(Utterance(utt, utt, str(audio), text, utt.split("-")[0], origin, language="English"))
        for flac in sorted(trans.parent.glob("*.flac")):
            if flac.stem not in listed:
                report.skip(flac.stem, "no-transcript", f"{flac} has no line in {trans}")
    return utterances


# ---------------------------------------------------------------------------------------------------------------
# Checking audio


def wav_truncation(path: str) -> Optional[str]:
    """For a RIFF/WAVE file, a message if its data chunk declares more bytes than the file holds."""
    with open(path, "rb") as f:
        header = f.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return None
        size = Path(path).stat().st_size
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return "no data chunk before the end of the file"
            name, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if name == b"data":
                available = size - f.tell()
                # Streams written without knowing their length (espeak-ng --stdout, sox to a pipe) declare a
                # placeholder, 0xFFFFFFFF or 0x7FFFF000; readers take the data to the end of the file.
                if length not in (0xFFFFFFFF, 0x7FFFF000) and length > available:
                    return f"data chunk declares {length} bytes but the file holds {available}"
                return None
            f.seek(length + (length & 1), io.SEEK_CUR)


def probe_recording(recording_id: str, audio: str) -> Recording:
    """The Recording for a wav.scp/LibriSpeech audio entry, or AudioProblem saying why it is unusable."""
    audio = audio.strip()
    if audio.endswith("|"):
        command = audio[:-1].strip()
        done = subprocess.run(command, shell=True, capture_output=True)
        if done.returncode != 0:
            err = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
            raise AudioProblem("unreadable-audio", f"command '{command}' failed ({done.returncode}): {err[0]}")
        try:
            recording = Recording.from_bytes(done.stdout, recording_id=recording_id)
        except Exception as e:
            raise AudioProblem("unreadable-audio", f"output of '{command}' is not audio: {summary(e)}") from None
        source = AudioSource(type="command", channels=recording.sources[0].channels, source=command)
        recording = fastcopy(recording, sources=[source])
    else:
        if not Path(audio).is_file():
            raise AudioProblem("missing-audio", f"{audio} does not exist")
        try:
            recording = Recording.from_file(audio, recording_id=recording_id)
        except Exception as e:
            raise AudioProblem("unreadable-audio", f"{audio}: {summary(e)}") from None
        truncated = wav_truncation(audio)
        if truncated:
            raise AudioProblem("truncated-audio", f"{audio}: {truncated}")
    if recording.duration < MIN_DURATION:
        detail = f"{audio} holds {recording.num_samples} samples ({recording.duration:.3f} s)"
        raise AudioProblem("too-short-audio", detail)
    if not audio.endswith("|"):
        try:  # decoding the last samples proves the declared length is there (a cut-off flac fails here)
            recording.load_audio(offset=max(recording.duration - TAIL_CHECK_SECONDS, 0.0))
        except Exception as e:
            detail = f"{audio} does not decode to its declared end: {summary(e)}"
            raise AudioProblem("truncated-audio", detail) from None
    return recording


def summary(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, shortened: Lhotse's audio errors span many lines."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def probe_all(utterances: Sequence[Utterance], jobs: int, desc: str) -> Dict[str, object]:
    """{recording_id: Recording or AudioProblem}, probing each distinct recording once, in `jobs` threads."""
    sources = {}
    for utt in utterances:
        sources.setdefault(utt.recording_id, utt.audio)

    def probe(item):
        try:
            return item[0], probe_recording(*item)
        except AudioProblem as problem:
            return item[0], problem

    results = {}
    bar = Progress(desc, total=len(sources), unit="recordings")
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for rec_id, result in pool.map(probe, sources.items()):
            results[rec_id] = result
            bar.update()
    bar.close()
    return results


# ---------------------------------------------------------------------------------------------------------------
# Building and writing cuts


def make_cut(utt: Utterance, recording: Recording, report: Report) -> Optional[Cut]:
    """A 16 kHz mono cut for one utterance; resampling/down-mixing are lazy Lhotse transforms, reported as warnings."""
    end = recording.duration if utt.end is None else utt.end
    if end > recording.duration:
        if end - recording.duration > MAX_SEGMENT_OVERSHOOT:
            detail = f"{utt.origin}: segment ends at {end} s, audio at {recording.duration} s"
            report.skip(utt.id, "bad-segment", detail)
            return None
        end = recording.duration
    if end - utt.start < MIN_DURATION:
        detail = f"{utt.origin}: segment {utt.start}-{end} s is shorter than {MIN_DURATION} s"
        report.skip(utt.id, "too-short-audio", detail)
        return None
    duration = round(end - utt.start, 6)
    supervision = SupervisionSegment(
        id=utt.id, recording_id=recording.id, start=0.0, duration=duration, channel=0,
        text=utt.text, speaker=utt.speaker, language=utt.language,
    )  # fmt: skip
    channels = recording.channel_ids
    tracks = [
        MonoCut(
            id=utt.id if len(channels) == 1 else f"{utt.id}-{channel}",
            start=utt.start, duration=duration, channel=channel, recording=recording,
            # Only the first track carries the transcript, so the mix has exactly one supervision.
            supervisions=[fastcopy(supervision, channel=channel)] if i == 0 else [],
        )  # fmt: skip
        for i, channel in enumerate(channels)
    ]
    if recording.sampling_rate != TARGET_SAMPLE_RATE:
        report.warn(utt.id, "resampled", f"{utt.audio}: {recording.sampling_rate} Hz -> {TARGET_SAMPLE_RATE} Hz")
        tracks = [t.resample(TARGET_SAMPLE_RATE) for t in tracks]
    if len(tracks) == 1:
        return tracks[0]
    # Down-mix lazily: the channels, each at 1/n volume, summed in a MixedCut make their mean.
    report.warn(utt.id, "downmixed", f"{utt.audio}: {len(tracks)} channels averaged to mono")
    scale = 1.0 / len(tracks)
    return MixedCut(id=utt.id, tracks=[MixTrack(cut=t.perturb_volume(scale, affix_id=False)) for t in tracks])


def build_cuts(utterances: Sequence[Utterance], recordings: Dict[str, object], report: Report) -> CutSet:
    cuts = []
    for utt in utterances:
        recording = recordings[utt.recording_id]
        if isinstance(recording, AudioProblem):
            report.skip(utt.id, recording.reason, f"{utt.origin}: {recording.detail}")
            continue
        cut = make_cut(utt, recording, report)
        if cut is None:
            continue
        try:
            validate(cut)
        except AssertionError as e:
            report.skip(utt.id, "invalid-manifest", f"{utt.origin}: {summary(e)}")
            continue
        cuts.append(cut)
    return CutSet.from_cuts(cuts)


def write_outputs(cuts: CutSet, report: Report, out_dir: Path, split: str) -> Path:
    """Write the report, then (if anything survived) the manifest, each atomically."""
    hours = sum(c.duration for c in cuts) / 3600
    atomic_write_text(report_path(out_dir, split), report.render(len(cuts), hours))
    if len(cuts) == 0:
        raise PreparationError(
            f"no usable utterance in {report.source} (split '{split}'): {len(report.skipped)} skipped; "
            f"see {report_path(out_dir, split)}"
        )
    validate(cuts)
    path = manifest_path(out_dir, split)
    with atomic_path(path) as tmp:
        cuts.to_file(tmp)
    logger.info(
        "%s: %d utterances, %.3f h, %d skipped, %d warnings -> %s",
        split, len(cuts), hours, len(report.skipped), len(report.warnings), path,
    )  # fmt: skip
    return path


def prepare_utterances(utterances: List[Utterance], report: Report, out_dir: Path, split: str, jobs: int) -> Path:
    recordings = probe_all(utterances, jobs, desc=f"checking audio of {split}")
    return write_outputs(build_cuts(utterances, recordings, report), report, Path(out_dir), split)


def prepare_kaldi(data_dir, out_dir, split: Optional[str] = None, jobs: int = 1) -> Path:
    """A Kaldi data dir (wav.scp, text, optional utt2spk and segments) -> OUT_DIR/cuts_<split>.jsonl.gz."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise PreparationError(f"Kaldi data dir {data_dir} does not exist")
    split = split or data_dir.resolve().name
    if not re.fullmatch(r"[\w.-]+", split):
        raise PreparationError(f"split name {split!r} must be letters, digits, '_', '-' or '.' (it names files)")
    report = Report(split, data_dir)
    return prepare_utterances(kaldi_utterances(data_dir, report), report, out_dir, split, jobs)


def prepare_librispeech(corpus_dir, out_dir, jobs: int = 1) -> Dict[str, Path]:
    """Every standard LibriSpeech part under corpus_dir -> OUT_DIR/cuts_<part>.jsonl.gz; returns {part: path}.

    Recording/utterance ids, speakers and paths follow lhotse.recipes.prepare_librispeech; unlike it, a bad file or
    line is skipped and reported instead of aborting the part.
    """
    root, parts = librispeech_parts(Path(corpus_dir))
    logger.info("LibriSpeech parts in %s: %s", root, ", ".join(parts))
    outputs = {}
    for part in parts:
        report = Report(part, root / part)
        utterances = librispeech_utterances(root / part, report)
        outputs[part] = prepare_utterances(utterances, report, out_dir, part, jobs)
    return outputs
