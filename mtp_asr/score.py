"""Word error rate with kaldialign, and the icefall-style result files: recogs, errs and the WER summary.

A result is a tuple (cut_id, reference text, hypothesis text). Both texts go through `normalize_text` (the same
normaliser the corpus preparation uses) before they are split into words, so case and punctuation never count as
errors. Every file is written atomically: readers see the old file or the complete new one.
"""
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import kaldialign

from mtp_asr.text import normalize_text
from mtp_asr.utils import atomic_write_text, logger

# The normaliser keeps only A-Z, digits and apostrophes, so "*" can never be a word.
EPS = "*"

Result = tuple[str, str, str]
Alignment = list[tuple[str, str]]


@dataclass
class ErrorStats:
    num_utts: int = 0
    ref_words: int = 0
    correct: int = 0
    insertions: int = 0
    deletions: int = 0
    substitutions: int = 0
    sentence_errors: int = 0

    @property
    def errors(self) -> int:
        return self.insertions + self.deletions + self.substitutions

    @property
    def wer(self) -> float:
        """Errors per 100 reference words.

        With no reference words at all the denominator is taken as 1: the WER is 0.0 when the hypotheses are empty
        too, else 100 * insertions (so inserting words into silence is visibly wrong, never a division by zero).
        """
        return 100.0 * self.errors / max(self.ref_words, 1)

    @property
    def ser(self) -> float:
        """Percentage of utterances with at least one error (0.0 when there are none)."""
        return 100.0 * self.sentence_errors / max(self.num_utts, 1)

    def as_dict(self) -> dict:
        return {**asdict(self), "errors": self.errors, "wer": self.wer, "ser": self.ser}


def compute_error_stats(results: Iterable[Result]) -> ErrorStats:
    return _tally(_align(results))


def write_recogs(path, results: Iterable[Result]) -> None:
    """icefall's recogs file: per cut, sorted by cut id, `cut_id:\\tref=[words]` then `cut_id:\\thyp=[words]`."""
    lines = []
    for cut_id, ref, hyp in _checked(results):
        lines.append(f"{cut_id}:\tref={_words(ref)}")
        lines.append(f"{cut_id}:\thyp={_words(hyp)}")
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def write_error_stats(path, test_set_name: str, results: Iterable[Result]) -> ErrorStats:
    """Write the errs file (WER, per-utterance alignments, error counts, per-word stats) and return the totals."""
    aligned = _align(results)
    stats = _tally(aligned)
    subs, dels, ins = Counter(), Counter(), Counter()
    # word -> [correct, errors as the reference word, errors as the hypothesis word]; see _per_word_lines.
    per_word: dict[str, list[int]] = {}
    utt_lines = []
    for cut_id, alignment in aligned:
        shown = []
        for ref_word, hyp_word in alignment:
            if ref_word == hyp_word:
                _word_counts(per_word, ref_word)[0] += 1
                shown.append(ref_word)
                continue
            shown.append(f"({ref_word}->{hyp_word})")
            if ref_word == EPS:
                ins[hyp_word] += 1
            elif hyp_word == EPS:
                dels[ref_word] += 1
            else:
                subs[(ref_word, hyp_word)] += 1
            if ref_word != EPS:
                _word_counts(per_word, ref_word)[1] += 1
            if hyp_word != EPS:
                _word_counts(per_word, hyp_word)[2] += 1
        utt_lines.append(f"{cut_id}:\t" + " ".join(shown))

    lines = [
        f"%WER = {stats.wer:.2f}",
        f"Errors: {stats.insertions} insertions, {stats.deletions} deletions, {stats.substitutions} substitutions, "
        f"over {stats.ref_words} reference words ({stats.correct} correct)",
        "Search below for sections starting with PER-UTT DETAILS:, SUBSTITUTIONS:, DELETIONS:, INSERTIONS:, "
        "PER-WORD STATS:",
        "",
        "PER-UTT DETAILS: corr or (ref->hyp)",
        *utt_lines,
        "",
        "SUBSTITUTIONS: count ref -> hyp",
        *(f"{count}   {ref} -> {hyp}" for (ref, hyp), count in _by_count(subs)),
        "",
        "DELETIONS: count ref",
        *(f"{count}   {word}" for word, count in _by_count(dels)),
        "",
        "INSERTIONS: count hyp",
        *(f"{count}   {word}" for word, count in _by_count(ins)),
        "",
        "PER-WORD STATS: word  corr tot_errs count_in_ref count_in_hyp",
        *_per_word_lines(per_word),
    ]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    logger.info(
        "%s: %%WER %.2f [%d / %d, %d ins, %d del, %d sub], %%SER %.2f [%d / %d]; details in %s",
        test_set_name, stats.wer, stats.errors, stats.ref_words, stats.insertions, stats.deletions,
        stats.substitutions, stats.ser, stats.sentence_errors, stats.num_utts, path,
    )
    return stats


def write_wer_summary(path, rows: Sequence[tuple[str, float]]) -> None:
    """`settings\\tWER`, then one line per decoding setting, best (lowest WER) first."""
    for settings, _ in rows:
        if "\t" in settings or "\n" in settings:
            raise ValueError(f"WER summary {path}: settings name {settings!r} contains a tab or newline")
    lines = ["settings\tWER"] + [f"{settings}\t{wer:.2f}" for settings, wer in sorted(rows, key=lambda r: (r[1], r[0]))]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _words(text: str) -> list[str]:
    return normalize_text(text).split()


def _checked(results: Iterable[Result]) -> list[Result]:
    """The results sorted by cut id, after checking their shape and that no cut id repeats."""
    results = list(results)
    for index, result in enumerate(results):
        if not (isinstance(result, (tuple, list)) and len(result) == 3 and all(isinstance(x, str) for x in result)):
            raise TypeError(f"result #{index} must be (cut_id, ref_text, hyp_text) strings, got {result!r}")
    results = sorted(results, key=lambda r: r[0])
    for previous, current in zip(results, results[1:]):
        if previous[0] == current[0]:
            raise ValueError(f"cut id {current[0]!r} occurs more than once in the results")
    return results


def _align(results: Iterable[Result]) -> list[tuple[str, Alignment]]:
    return [(cut_id, kaldialign.align(_words(ref), _words(hyp), EPS)) for cut_id, ref, hyp in _checked(results)]


def _tally(aligned: list[tuple[str, Alignment]]) -> ErrorStats:
    stats = ErrorStats(num_utts=len(aligned))
    for _, alignment in aligned:
        utt_errors = 0
        for ref_word, hyp_word in alignment:
            if ref_word != EPS:
                stats.ref_words += 1
            if ref_word == hyp_word:
                stats.correct += 1
                continue
            utt_errors += 1
            if ref_word == EPS:
                stats.insertions += 1
            elif hyp_word == EPS:
                stats.deletions += 1
            else:
                stats.substitutions += 1
        stats.sentence_errors += utt_errors > 0
    return stats


def _word_counts(per_word: dict[str, list[int]], word: str) -> list[int]:
    return per_word.setdefault(word, [0, 0, 0])


def _per_word_lines(per_word: dict[str, list[int]]) -> list[str]:
    """`word corr tot_errs count_in_ref count_in_hyp`, most errors first.

    A substitution is an error of both its reference and its hypothesis word, a deletion of the reference word and an
    insertion of the hypothesis word; count_in_ref = corr + reference-side errors, count_in_hyp likewise.
    """
    rows = [(word, corr, ref_errs + hyp_errs, corr + ref_errs, corr + hyp_errs)
            for word, (corr, ref_errs, hyp_errs) in per_word.items()]
    rows.sort(key=lambda row: (-row[2], row[0]))
    return [f"{word}   {corr} {errs} {in_ref} {in_hyp}" for word, corr, errs, in_ref, in_hyp in rows]


def _by_count(counter: Counter) -> list:
    """(key, count) pairs, most frequent first, ties in key order so the files are reproducible."""
    return sorted(counter.items(), key=lambda item: (-item[1], item[0]))
