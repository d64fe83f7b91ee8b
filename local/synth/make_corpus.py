#!/usr/bin/env python3
"""Make the synthetic demo corpus: passages of real English sentences spoken by offline TTS voices, as Kaldi dirs.

    python local/synth/make_corpus.py OUT_DIR --hours 0.8 --seed 0 --jobs 2 [--engines espeak,flite]

Writes under OUT_DIR:
  train/ dev/ test/ test_unseen_voice/   Kaldi data dirs: wav.scp, text, utt2spk, spk2utt (sorted by utt id)
  wav/<split>/<utt_id>.wav                16 kHz mono 16-bit audio
  lm_text.txt                             decoder LM pre-training text, one line each: every in-vocabulary sentence
                                          except dev/test ones, and every train passage
  ngram_text.txt                          word n-gram LM text (text without audio), one sentence per line: every
                                          sentence, whatever its words, of the source documents (a WordNet gloss,
                                          a fortune cookie) that hold no dev/test sentence
  utterances.jsonl                        one line per planned utterance: voice, passage, parameters, outcome
  failed.txt                              one line per failed synthesis: utt id, engine/voice, error
  stats.json                              sizes per split and overall (also returned by make_corpus); written last

An utterance is a passage of 1-3 sentences (12-30 words, mean ~18; see synth_passages) spoken as one recording.
`hours` is the total audio over all four splits. dev and test take about 5% and 9% of the utterances (at least 3,
at most 100 and 170, so they stay cheap to decode); test_unseen_voice speaks the test passages with held-out
voices (see synth_voices); train gets the rest. No sentence of a dev or test passage occurs in train or
lm_text.txt, nor any document that holds one in ngram_text.txt; once every train passage has been spoken, the train
sentences are regrouped into new passages.
Everything is drawn from one random generator seeded by `seed`, so a seed fixes passages, voices, parameters and
file names, and the audio too for the same engine versions. Utterance ids are `<voice_id>-p<passage id>`.
"""
import argparse
import collections
import itertools
import json
import logging
import multiprocessing
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # the sibling modules, also when the CLI loads this file by path
    sys.path.insert(0, str(_HERE))
if str(_HERE.parents[1]) not in sys.path:  # mtp_asr from this checkout when the package is not installed
    sys.path.append(str(_HERE.parents[1]))

from mtp_asr.utils import Progress, atomic_write_text, format_seconds, logger, setup_logging  # noqa: E402
from synth_render import RenderBatch, RenderJob, Result, render_batch  # noqa: E402
from synth_passages import Passage, form_passages, passage_units  # noqa: E402
from synth_sentences import VOCAB_SIZE, SentencePool, load_sentence_pool, source_documents  # noqa: E402
from synth_voices import (  # noqa: E402
    ENGINE_BINARIES, Voice, VoicePicker, check_engines, default_engines, draw_params, missing_engines)

SPLITS = ("train", "dev", "test", "test_unseen_voice")
DEV_FRACTION, TEST_FRACTION = 0.05, 0.09
# Caps in passages of ~18 words: as many words as 300 and 500 single sentences of ~6, so eval stays cheap to decode.
MIN_EVAL_UTTS, MAX_DEV_UTTS, MAX_TEST_UTTS = 3, 100, 170
MIN_TRAIN_UTTS = 3
# Planning estimate of an utterance's length at rate 1: least-squares fit over 865 passages of the default engine
# mix (engines differ by -5% to +19%); stats report the real hours.
SECONDS_FIXED, SECONDS_PER_WORD, SECONDS_PER_PAUSE = 0.75, 0.23, 0.44
BATCH_SIZE = 16
# Rough real-time factors measured on one core, to start the slowest batches first so the pool ends together.
SPEED_X_REALTIME = {"espeak": 300, "flite": 60, "festival": 150, "festival_slthts": 20, "hibari": 30}


@dataclass(frozen=True)
class Utterance:
    utt_id: str
    split: str
    voice: Voice
    passage_id: int
    passage: Passage
    params: dict


@dataclass(frozen=True)
class CorpusPlan:
    utterances: List[Utterance]
    train_passages: List[Passage]  # every passage formed of train sentences, spoken or not (LM text)


def estimate_seconds(passage: Passage, params: Optional[dict] = None) -> float:
    """Planned length of `passage` spoken with `params` (at rate 1 without): leading and trailing silence, words,
    and the pause between sentences."""
    seconds = SECONDS_FIXED + SECONDS_PER_WORD * passage.words + SECONDS_PER_PAUSE * (len(passage.sentence_indices) - 1)
    return seconds / params["rate"] / params.get("tempo", 1.0) if params else seconds


def _clamp(value: float, low: int, high: int) -> int:
    return int(min(max(round(value), low), high))


def plan_corpus(pool: SentencePool, picker: VoicePicker, hours: float, rng: random.Random) -> CorpusPlan:
    """Which passage each voice speaks in which split, with its parameters; about `hours` of audio in all.

    The pool is cut into passages once; test and dev take whole passages, so no sentence of theirs is in train.
    Train speaks its passages in turn; when every one has been spoken, its sentences are regrouped into new passages.
    """
    units = passage_units(pool, range(len(pool.sentences)))
    rng.shuffle(units)
    passages = form_passages(pool, units, rng)
    expected_utts = hours * 3600 / (sum(estimate_seconds(p) for p in passages) / len(passages))
    n_test = _clamp(TEST_FRACTION * expected_utts, MIN_EVAL_UTTS, MAX_TEST_UTTS)
    n_dev = _clamp(DEV_FRACTION * expected_utts, MIN_EVAL_UTTS, MAX_DEV_UTTS)
    if n_test + n_dev + MIN_TRAIN_UTTS > len(passages):
        raise ValueError(f"only {len(passages)} passages of {len(pool.sentences)} in-vocabulary sentences: too few "
                         f"for {n_test} test and {n_dev} dev passages plus train; raise the vocabulary size")
    ids = itertools.count()
    numbered = [(next(ids), p) for p in passages]
    test, dev, train = numbered[:n_test], numbered[n_test:n_test + n_dev], numbered[n_test + n_dev:]
    plan: List[Utterance] = []

    def add(split: str, passage_id: int, passage: Passage, voice: Voice) -> float:
        utt = Utterance(f"{voice.voice_id}-p{passage_id:05d}", split, voice, passage_id, passage,
                        draw_params(voice, rng))
        plan.append(utt)
        return estimate_seconds(passage, utt.params)

    budget = hours * 3600
    for passage_id, passage in test:
        budget -= add("test", passage_id, passage, picker.seen_voice(rng))
        budget -= add("test_unseen_voice", passage_id, passage, picker.held_out_voice(rng))
    for passage_id, passage in dev:
        budget -= add("dev", passage_id, passage, picker.seen_voice(rng))
    train_passages = [p for _, p in train]
    train_sentences = [i for p in train_passages for i in p.sentence_indices]
    queue = collections.deque(train)
    n_train = 0
    while budget > 0 or n_train < MIN_TRAIN_UTTS:
        if not queue:  # every train passage spoken: the same sentences in new passages, rather than repeats
            units = passage_units(pool, train_sentences)
            rng.shuffle(units)
            regrouped = form_passages(pool, units, rng)
            train_passages += regrouped
            queue.extend((next(ids), p) for p in regrouped)
        passage_id, passage = queue.popleft()
        budget -= add("train", passage_id, passage, picker.seen_voice(rng))
        n_train += 1
    return CorpusPlan(plan, train_passages)


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
            jobs = tuple(RenderJob(u.utt_id, u.passage.spoken, u.params, str(wav_path(out_dir, u))) for u in chunk)
            batches.append(RenderBatch(voice.engine, binaries.get(voice.engine), voice.name, jobs))
            costs.append(sum(estimate_seconds(u.passage, u.params) for u in chunk) / speed)
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
    atomic_write_text(split_dir / "text", "".join(f"{u.utt_id} {u.passage.text}\n" for u in utts))
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
    engines = check_engines([e.strip() for e in engines]) if engines else default_engines()
    for engine in missing_engines(engines):
        logger.warning("engine %s is not installed here: its utterances will fail (install it, or leave it out of "
                       "--engines)", engine)
    picker = VoicePicker(engines)
    pool = load_sentence_pool(vocab_size)
    logger.info("%d in-vocabulary sentences (of %d clean candidates, %d in runs of one source), vocabulary %d words",
                len(pool.sentences), pool.candidates, sum(len(r) for r in pool.runs), len(pool.vocabulary))
    corpus_plan = plan_corpus(pool, picker, hours, random.Random(seed))
    plan = corpus_plan.utterances
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

    empty = [s for s in SPLITS if not any(u.split == s for u in ok)]
    if empty:  # e.g. every held-out voice of a missing engine: say so here, not as an empty data dir later
        raise RuntimeError(f"no synthesis of split(s) {', '.join(empty)} succeeded: see {out_dir / 'failed.txt'}")
    for split in SPLITS:
        _write_data_dir(out_dir / split, [u for u in ok if u.split == split], out_dir)
    _remove_stale_wavs(out_dir, ok)
    lm_sentences, lm_passages = lm_text(pool, corpus_plan)
    atomic_write_text(out_dir / "lm_text.txt", "".join(f"{t}\n" for t in sorted(lm_sentences | lm_passages)))
    ngram_lines, dropped_documents = ngram_text(pool, corpus_plan)
    atomic_write_text(out_dir / "ngram_text.txt", "".join(f"{t}\n" for t in ngram_lines))
    atomic_write_text(out_dir / "utterances.jsonl", "".join(
        json.dumps(_utterance_record(pool, u, results[u.utt_id])) + "\n" for u in sorted(plan, key=lambda u: u.utt_id)))

    seconds = {u.utt_id: results[u.utt_id][1] for u in ok}
    stats = {
        "splits": {split: _split_stats([u for u in ok if u.split == split], seconds) for split in SPLITS},
        **_split_stats(ok, seconds),
        "sentences_per_utterance": _summary([len(u.passage.sentence_indices) for u in ok]),
        "held_out_voices": sorted({u.voice.voice_id for u in ok if u.voice.held_out}),
        "engines": list(engines),
        "utterances_per_engine": {e: sum(u.voice.engine == e for u in ok) for e in engines},
        "vocabulary_size": len(pool.vocabulary),
        "sentences_in_vocabulary": len(pool.sentences),
        "lm_text_lines": len(lm_sentences | lm_passages),
        "lm_text_sentences": len(lm_sentences),
        "lm_text_passages": len(lm_passages - lm_sentences),
        "ngram_text_lines": len(ngram_lines),
        "ngram_text_words": sum(len(t.split()) for t in ngram_lines),
        "ngram_text_documents_dropped": dropped_documents,
        "failed_syntheses": len(failed),
        "wall_clock_seconds": round(time.monotonic() - start, 1),
        "seed": seed,
        "hours_asked": hours,
        "jobs": jobs,
    }
    atomic_write_text(out_dir / "stats.json", json.dumps(stats, indent=2) + "\n")
    words = stats["words_per_utterance"]
    logger.info("corpus in %s: %d utterances, %.2f h, %d voices, vocabulary %d, %d-%d words per utterance "
                "(mean %.1f), %d failed, %s", out_dir, stats["utterances"], stats["hours"], stats["voices"],
                stats["vocabulary_size"], words["min"], words["max"], words["mean"], len(failed),
                format_seconds(stats["wall_clock_seconds"]))
    return stats


def held_out_sentences(corpus_plan: CorpusPlan) -> Set[int]:
    """The pool indices of the sentences that dev and test passages hold."""
    return {i for u in corpus_plan.utterances if u.split != "train" for i in u.passage.sentence_indices}


def lm_text(pool: SentencePool, corpus_plan: CorpusPlan) -> Tuple[Set[str], Set[str]]:
    """The LM text lines: every in-vocabulary sentence that no dev/test passage holds, and every train passage."""
    held_out = held_out_sentences(corpus_plan)
    sentences = {s.text for i, s in enumerate(pool.sentences) if i not in held_out}
    return sentences, {p.text for p in corpus_plan.train_passages}


def ngram_text(pool: SentencePool, corpus_plan: CorpusPlan) -> Tuple[List[str], int]:
    """The word n-gram LM's lines (distinct sentences, sorted) and the number of documents left out: those holding
    a sentence of a dev/test passage (the whole document, so no neighbour of a test sentence lends it context)."""
    held_out = {pool.sentences[i].text for i in held_out_sentences(corpus_plan)}
    lines, dropped = set(), 0
    for document in source_documents():
        if any(text in held_out or pool_text in held_out for text, pool_text in document):
            dropped += 1
            continue
        lines.update(text for text, _ in document if text)
    return sorted(lines), dropped


def _utterance_record(pool: SentencePool, u: Utterance, result: Result) -> dict:
    return {"utt_id": u.utt_id, "split": u.split, "voice_id": u.voice.voice_id, "engine": u.voice.engine,
            "voice": u.voice.name, "passage_id": u.passage_id, "sentence_indices": list(u.passage.sentence_indices),
            "sentences": [pool.sentences[i].text for i in u.passage.sentence_indices], "text": u.passage.text,
            "spoken": u.passage.spoken, "params": u.params, "seconds": result[1], "error": result[2]}


def _split_stats(utts: List[Utterance], seconds: Dict[str, float]) -> dict:
    return {
        "utterances": len(utts),
        "hours": round(sum(seconds[u.utt_id] for u in utts) / 3600, 4),
        "voices": len({u.voice.voice_id for u in utts}),
        "passages": len({u.passage_id for u in utts}),
        "sentences": len({i for u in utts for i in u.passage.sentence_indices}),
        "words_per_utterance": _summary([u.passage.words for u in utts]),
        "seconds_per_utterance": _summary([seconds[u.utt_id] for u in utts]),
    }


def _summary(values: Sequence[float]) -> dict:
    if not values:
        return {"min": None, "mean": None, "max": None}
    return {"min": round(min(values), 2), "mean": round(sum(values) / len(values), 2), "max": round(max(values), 2)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--hours", type=float, required=True, help="total audio over all splits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="synthesis processes")
    parser.add_argument("--engines", default=None,
                        help="comma-separated subset of espeak,flite,festival,hibari "
                             "(default: espeak,flite,festival, plus hibari where importable)")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="most frequent words the sentences use")
    args = parser.parse_args(argv)
    setup_logging(logging.INFO)
    make_corpus(args.out_dir, args.hours, seed=args.seed, jobs=args.jobs, engines=args.engines,
                vocab_size=args.vocab_size)


if __name__ == "__main__":
    main()
