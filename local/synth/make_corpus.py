#!/usr/bin/env python3
"""Make the synthetic demo corpus: real English sentences spoken by offline TTS voices, as Kaldi data dirs.

    python local/synth/make_corpus.py OUT_DIR --hours 0.8 --seed 0 --jobs 2 [--engines espeak,flite]

Writes under OUT_DIR:
  train/ dev/ test/ test_unseen_voice/   Kaldi data dirs: wav.scp, text, utt2spk, spk2utt (sorted by utt id)
  wav/<split>/<utt_id>.wav                16 kHz mono 16-bit audio
  lm_text.txt                             every in-vocabulary sentence except dev/test ones (decoder LM pre-training)
  utterances.jsonl                        one line per planned utterance: voice, sentence, parameters, outcome
  failed.txt                              one line per failed synthesis: utt id, engine/voice, error
  stats.json                              sizes per split and overall (also returned by make_corpus); written last

`hours` is the total audio over all four splits. dev and test take about 5% and 9% of the utterances (at least 3,
at most 300 and 500, so they stay cheap to decode); test_unseen_voice speaks the test sentences with held-out
voices (see synth_voices); train gets the rest. Sentences of dev and test never occur in train or lm_text.txt;
a train sentence is reused with other voices once every train sentence has been spoken.
Everything is drawn from one random generator seeded by `seed`, so a seed fixes sentences, voices, parameters and
file names, and the audio too for the same engine versions. Utterance ids are `<voice_id>-s<sentence index>`.
"""
import argparse
import collections
import json
import logging
import multiprocessing
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # the sibling modules, also when the CLI loads this file by path
    sys.path.insert(0, str(_HERE))
if str(_HERE.parents[1]) not in sys.path:  # mtp_asr from this checkout when the package is not installed
    sys.path.append(str(_HERE.parents[1]))

from mtp_asr.utils import Progress, atomic_write_text, format_seconds, logger, setup_logging  # noqa: E402
from synth_render import RenderBatch, RenderJob, Result, render_batch  # noqa: E402
from synth_sentences import VOCAB_SIZE, Sentence, SentencePool, load_sentence_pool  # noqa: E402
from synth_voices import (  # noqa: E402
    ENGINE_BINARIES, Voice, VoicePicker, available_engines, check_engines, draw_params)

SPLITS = ("train", "dev", "test", "test_unseen_voice")
DEV_FRACTION, TEST_FRACTION = 0.05, 0.09
MIN_EVAL_UTTS, MAX_DEV_UTTS, MAX_TEST_UTTS = 3, 300, 500
MIN_TRAIN_UTTS = 3
# Planning estimate of an utterance's length (measured over the engine mix at rate 1); stats report real hours.
SECONDS_FIXED, SECONDS_PER_WORD = 0.48, 0.24
BATCH_SIZE = 16
# Rough real-time factors measured on one core, to start the slowest batches first so the pool ends together.
SPEED_X_REALTIME = {"espeak": 300, "flite": 60, "festival": 150, "festival_slthts": 20, "hibari": 30}


@dataclass(frozen=True)
class Utterance:
    utt_id: str
    split: str
    voice: Voice
    sentence_index: int
    sentence: Sentence
    params: dict


def estimate_seconds(sentence: Sentence, params: dict) -> float:
    return (SECONDS_FIXED + SECONDS_PER_WORD * len(sentence.text.split())) / params["rate"] / params.get("tempo", 1.0)


def _clamp(value: float, low: int, high: int) -> int:
    return int(min(max(round(value), low), high))


def plan_corpus(pool: SentencePool, picker: VoicePicker, hours: float, rng: random.Random) -> List[Utterance]:
    """Which sentence each voice speaks in which split, with its parameters; about `hours` of audio in all."""
    order = list(range(len(pool.sentences)))
    rng.shuffle(order)
    mean_words = sum(len(s.text.split()) for s in pool.sentences) / len(pool.sentences)
    expected_utts = hours * 3600 / (SECONDS_FIXED + SECONDS_PER_WORD * mean_words)
    n_test = _clamp(TEST_FRACTION * expected_utts, MIN_EVAL_UTTS, MAX_TEST_UTTS)
    n_dev = _clamp(DEV_FRACTION * expected_utts, MIN_EVAL_UTTS, MAX_DEV_UTTS)
    if n_test + n_dev + MIN_TRAIN_UTTS > len(order):
        raise ValueError(f"only {len(order)} sentences in the vocabulary: too few for {n_test} test and {n_dev} dev "
                         f"sentences plus train; raise the vocabulary size")
    test, dev, train = order[:n_test], order[n_test:n_test + n_dev], order[n_test + n_dev:]
    plan: List[Utterance] = []

    def add(split: str, index: int, voice: Voice) -> float:
        utt_id = f"{voice.voice_id}-s{index:05d}"
        utt = Utterance(utt_id, split, voice, index, pool.sentences[index], draw_params(voice, rng))
        plan.append(utt)
        return estimate_seconds(utt.sentence, utt.params)

    budget = hours * 3600
    for index in test:
        budget -= add("test", index, picker.seen_voice(rng))
        budget -= add("test_unseen_voice", index, picker.held_out_voice(rng))
    for index in dev:
        budget -= add("dev", index, picker.seen_voice(rng))
    voices_used: Dict[int, set] = {index: set() for index in train}
    n_train = 0
    while budget > 0 or n_train < MIN_TRAIN_UTTS:  # each round speaks every train sentence with one more voice
        added = False
        for index in train:
            if budget <= 0 and n_train >= MIN_TRAIN_UTTS:
                break
            voice = picker.seen_voice(rng, exclude=frozenset(voices_used[index]))
            if voice is None:
                continue
            voices_used[index].add(voice.voice_id)
            budget -= add("train", index, voice)
            n_train += 1
            added = True
        if not added:
            logger.warning("every train sentence is spoken by all %d seen voices: the corpus is %.2f h short",
                           picker.seen_voice_count(), budget / 3600)
            break
    return plan


def make_batches(plan: Sequence[Utterance], out_dir: Path, binaries: Dict[str, str]) -> List[RenderBatch]:
    """Utterances grouped by voice, BATCH_SIZE at a time, the slowest batches first."""
    by_voice: Dict[Voice, List[Utterance]] = collections.defaultdict(list)
    for utt in plan:
        by_voice[utt.voice].append(utt)
    batches, costs = [], []
    for voice, utts in sorted(by_voice.items(), key=lambda kv: kv[0].voice_id):
        speed = SPEED_X_REALTIME.get(voice.voice_id, SPEED_X_REALTIME[voice.engine])
        for start in range(0, len(utts), BATCH_SIZE):
            chunk = utts[start:start + BATCH_SIZE]
            jobs = tuple(RenderJob(u.utt_id, u.sentence.spoken, u.params, str(wav_path(out_dir, u))) for u in chunk)
            batches.append(RenderBatch(voice.engine, binaries.get(voice.engine), voice.name, jobs))
            costs.append(sum(estimate_seconds(u.sentence, u.params) for u in chunk) / speed)
    order = sorted(range(len(batches)), key=lambda i: -costs[i])
    return [batches[i] for i in order]


def wav_path(out_dir: Path, utt: Utterance) -> Path:
    return out_dir / "wav" / utt.split / f"{utt.utt_id}.wav"


def synthesize(batches: List[RenderBatch], jobs: int) -> Dict[str, Result]:
    """Render all batches over `jobs` processes, logging utterances done/total, rate, ETA and failures."""
    bar = Progress("synthesis", total=sum(len(b.jobs) for b in batches), unit="utt", every=10.0)
    results: Dict[str, Result] = {}
    failed, seconds = 0, 0.0

    def consume(batch_results: Iterable[Result]) -> None:
        nonlocal failed, seconds
        batch_results = list(batch_results)
        for result in batch_results:
            results[result[0]] = result
            failed += result[2] is not None
            seconds += result[1] or 0.0
        bar.update(len(batch_results), extra=f"{seconds / 3600:.2f} h of audio, {failed} failed")

    if jobs == 1:
        for batch in batches:
            consume(render_batch(batch))
    else:
        with multiprocessing.Pool(jobs) as pool:
            for batch_results in pool.imap_unordered(render_batch, batches):
                consume(batch_results)
    bar.close(extra=f"{seconds / 3600:.2f} h of audio, {failed} failed")
    return results


def _write_data_dir(split_dir: Path, utts: List[Utterance], out_dir: Path) -> None:
    utts = sorted(utts, key=lambda u: u.utt_id)
    spk2utt: Dict[str, List[str]] = collections.defaultdict(list)
    for u in utts:
        spk2utt[u.voice.voice_id].append(u.utt_id)
    atomic_write_text(split_dir / "wav.scp", "".join(f"{u.utt_id} {wav_path(out_dir, u)}\n" for u in utts))
    atomic_write_text(split_dir / "text", "".join(f"{u.utt_id} {u.sentence.text}\n" for u in utts))
    atomic_write_text(split_dir / "utt2spk", "".join(f"{u.utt_id} {u.voice.voice_id}\n" for u in utts))
    atomic_write_text(split_dir / "spk2utt", "".join(f"{s} {' '.join(ids)}\n" for s, ids in sorted(spk2utt.items())))


def _remove_stale_wavs(out_dir: Path, kept: Iterable[Utterance]) -> None:
    """Drop WAVs of an earlier run into the same folder (or of failed utterances) that no data dir lists."""
    keep = {wav_path(out_dir, u) for u in kept}
    for split in SPLITS:
        for path in (out_dir / "wav" / split).glob("*.wav"):
            if path not in keep:
                path.unlink()


def make_corpus(out_dir: Path, hours: float, seed: int = 0, jobs: int = 2, engines: Optional[Sequence[str]] = None,
                vocab_size: int = VOCAB_SIZE) -> dict:
    """Synthesize the corpus under `out_dir` (see the module doc) and return its stats (as in stats.json)."""
    start = time.monotonic()
    if hours <= 0:
        raise ValueError(f"--hours must be positive, got {hours}")
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    out_dir = Path(out_dir).resolve()
    if isinstance(engines, str):
        engines = engines.split(",")
    if engines:
        engines = check_engines([e.strip() for e in engines])
    else:
        engines = available_engines()
        logger.info("engines found here: %s", ", ".join(engines) or "none")
    picker = VoicePicker(engines)
    pool = load_sentence_pool(vocab_size)
    logger.info("%d in-vocabulary sentences (of %d clean candidates), vocabulary %d words",
                len(pool.sentences), pool.candidates, len(pool.vocabulary))
    plan = plan_corpus(pool, picker, hours, random.Random(seed))
    logger.info("synthesizing %d utterances (about %.2f h) with %s on %d process(es)", len(plan), hours,
                ", ".join(engines), jobs)
    batches = make_batches(plan, out_dir, dict(ENGINE_BINARIES))
    results = synthesize(batches, jobs)

    ok = [u for u in plan if results[u.utt_id][2] is None]
    failed = sorted((u for u in plan if results[u.utt_id][2] is not None), key=lambda u: u.utt_id)
    atomic_write_text(out_dir / "failed.txt", "".join(
        f"{u.utt_id}\t{u.voice.engine}/{u.voice.name}\t{results[u.utt_id][2]}\n" for u in failed))
    if not ok:
        raise RuntimeError(f"all {len(plan)} syntheses failed: see {out_dir / 'failed.txt'}")
    for u in failed[:5]:
        logger.warning("failed %s (%s/%s): %s", u.utt_id, u.voice.engine, u.voice.name, results[u.utt_id][2])

    for split in SPLITS:
        _write_data_dir(out_dir / split, [u for u in ok if u.split == split], out_dir)
    _remove_stale_wavs(out_dir, ok)
    eval_sentences = {u.sentence.text for u in plan if u.split != "train"}
    lm_text = sorted(s.text for s in pool.sentences if s.text not in eval_sentences)
    atomic_write_text(out_dir / "lm_text.txt", "".join(f"{t}\n" for t in lm_text))
    atomic_write_text(out_dir / "utterances.jsonl", "".join(json.dumps({
        "utt_id": u.utt_id, "split": u.split, "voice_id": u.voice.voice_id, "engine": u.voice.engine,
        "voice": u.voice.name, "sentence_index": u.sentence_index, "text": u.sentence.text,
        "spoken": u.sentence.spoken, "params": u.params, "seconds": results[u.utt_id][1],
        "error": results[u.utt_id][2]}) + "\n" for u in sorted(plan, key=lambda u: u.utt_id)))

    seconds = {u.utt_id: results[u.utt_id][1] for u in ok}
    lengths = [len(u.sentence.text.split()) for u in ok]
    stats = {
        "splits": {split: {
            "utterances": sum(u.split == split for u in ok),
            "hours": round(sum(seconds[u.utt_id] for u in ok if u.split == split) / 3600, 4),
            "voices": len({u.voice.voice_id for u in ok if u.split == split}),
            "sentences": len({u.sentence_index for u in ok if u.split == split}),
        } for split in SPLITS},
        "utterances": len(ok),
        "hours": round(sum(seconds.values()) / 3600, 4),
        "voices": len({u.voice.voice_id for u in ok}),
        "held_out_voices": sorted({u.voice.voice_id for u in ok if u.voice.held_out}),
        "engines": list(engines),
        "vocabulary_size": len(pool.vocabulary),
        "sentences_in_vocabulary": len(pool.sentences),
        "lm_text_sentences": len(lm_text),
        "sentence_length_words": [min(lengths), max(lengths)],
        "failed_syntheses": len(failed),
        "wall_clock_seconds": round(time.monotonic() - start, 1),
        "seed": seed,
        "hours_asked": hours,
        "jobs": jobs,
    }
    atomic_write_text(out_dir / "stats.json", json.dumps(stats, indent=2) + "\n")
    logger.info("corpus in %s: %d utterances, %.2f h, %d voices, vocabulary %d, %d failed, %s", out_dir,
                stats["utterances"], stats["hours"], stats["voices"], stats["vocabulary_size"], len(failed),
                format_seconds(stats["wall_clock_seconds"]))
    return stats


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--hours", type=float, required=True, help="total audio over all splits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="synthesis processes")
    parser.add_argument("--engines", default=None,
                        help="comma-separated subset of espeak,flite,festival,hibari (default: all installed)")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="most frequent words the sentences use")
    args = parser.parse_args(argv)
    setup_logging(logging.INFO)
    make_corpus(args.out_dir, args.hours, seed=args.seed, jobs=args.jobs, engines=args.engines,
                vocab_size=args.vocab_size)


if __name__ == "__main__":
    main()
