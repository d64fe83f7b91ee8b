"""Scoring and result files checked against alignments and counts worked out by hand."""
import ast

import pytest

from mtp_asr.plot import plot_tradeoff
from mtp_asr.score import (
    ErrorStats,
    compute_error_stats,
    write_error_stats,
    write_recogs,
    write_wer_summary,
)

# Given out of order on purpose: every file lists cuts sorted by id.
RESULTS = [
    ("e-empty", "yes, yes, please", ""),                                # 3 deletions (YES twice)
    ("a-sub", "The cat sat on the mat.", "the cat sat on a mat"),       # THE -> A
    ("d-corr", "Don't stop!", "DON'T   STOP"),                          # correct after normalisation
    ("c-ins", "good morning", "Good morning, everyone"),                # EVERYONE inserted
    ("b-del", "hello big world", "hello world"),                        # BIG deleted
]
# Reference words 6 + 3 + 2 + 2 + 3 = 16; correct 5 + 2 + 2 + 2 + 0 = 11; errors 1 sub + 4 del + 1 ins = 6.


def test_error_stats_counted_by_hand():
    stats = compute_error_stats(RESULTS)
    assert stats == ErrorStats(num_utts=5, ref_words=16, correct=11, insertions=1, deletions=4, substitutions=1,
                               sentence_errors=4)
    assert stats.errors == 6
    assert stats.wer == pytest.approx(37.5)
    assert stats.ser == pytest.approx(80.0)
    assert stats.as_dict() == {"num_utts": 5, "ref_words": 16, "correct": 11, "insertions": 1, "deletions": 4,
                               "substitutions": 1, "sentence_errors": 4, "errors": 6, "wer": 37.5, "ser": 80.0}


def test_case_and_punctuation_are_not_errors():
    stats = compute_error_stats([("u", "Hello, World! It's fine.", "hello world it's FINE")])
    assert (stats.correct, stats.errors, stats.wer) == (4, 0, 0.0)


def test_wer_without_reference_words():
    assert compute_error_stats([]).wer == 0.0
    assert compute_error_stats([("silence", "", "")]).wer == 0.0
    inserted = compute_error_stats([("silence", "...", "uh um")])
    assert (inserted.ref_words, inserted.insertions, inserted.sentence_errors) == (0, 2, 1)
    assert inserted.wer == 200.0  # documented rule: 100 * insertions when there is no reference word


def test_errs_file(tmp_path):
    path = tmp_path / "errs-test-clean-greedy.txt"
    stats = write_error_stats(path, "test-clean", RESULTS)
    assert stats.wer == pytest.approx(37.5)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0] == "%WER = 37.50"
    assert lines[1] == "Errors: 1 insertions, 4 deletions, 1 substitutions, over 16 reference words (11 correct)"
    for header in ("PER-UTT DETAILS:", "SUBSTITUTIONS:", "DELETIONS:", "INSERTIONS:", "PER-WORD STATS:"):
        assert header in lines[2]

    sections = _sections(text)
    assert sections["PER-UTT DETAILS: corr or (ref->hyp)"] == [
        "a-sub:\tTHE CAT SAT ON (THE->A) MAT",
        "b-del:\tHELLO (BIG->*) WORLD",
        "c-ins:\tGOOD MORNING (*->EVERYONE)",
        "d-corr:\tDON'T STOP",
        "e-empty:\t(YES->*) (YES->*) (PLEASE->*)",
    ]
    assert sections["SUBSTITUTIONS: count ref -> hyp"] == ["1   THE -> A"]
    assert sections["DELETIONS: count ref"] == ["2   YES", "1   BIG", "1   PLEASE"]
    assert sections["INSERTIONS: count hyp"] == ["1   EVERYONE"]
    per_word = {line.split()[0]: tuple(map(int, line.split()[1:]))
                for line in sections["PER-WORD STATS: word  corr tot_errs count_in_ref count_in_hyp"]}
    # word: (corr, tot_errs, count_in_ref, count_in_hyp)
    assert per_word == {
        "YES": (0, 2, 2, 0), "A": (0, 1, 0, 1), "BIG": (0, 1, 1, 0), "EVERYONE": (0, 1, 0, 1),
        "PLEASE": (0, 1, 1, 0), "THE": (1, 1, 2, 1), "CAT": (1, 0, 1, 1), "DON'T": (1, 0, 1, 1),
        "GOOD": (1, 0, 1, 1), "HELLO": (1, 0, 1, 1), "MAT": (1, 0, 1, 1), "MORNING": (1, 0, 1, 1),
        "ON": (1, 0, 1, 1), "SAT": (1, 0, 1, 1), "STOP": (1, 0, 1, 1), "WORLD": (1, 0, 1, 1),
    }
    # most errors first, ties alphabetical
    assert list(per_word)[:7] == ["YES", "A", "BIG", "EVERYONE", "PLEASE", "THE", "CAT"]


def test_recogs_file(tmp_path):
    path = tmp_path / "recogs-test-clean-greedy.txt"
    write_recogs(path, RESULTS)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[:4] == [
        "a-sub:\tref=['THE', 'CAT', 'SAT', 'ON', 'THE', 'MAT']",
        "a-sub:\thyp=['THE', 'CAT', 'SAT', 'ON', 'A', 'MAT']",
        "b-del:\tref=['HELLO', 'BIG', 'WORLD']",
        "b-del:\thyp=['HELLO', 'WORLD']",
    ]
    assert len(lines) == 2 * len(RESULTS)
    cut_ids = [line.split(":\t")[0] for line in lines[::2]]
    assert cut_ids == sorted(cut_ids)
    d_ref, d_hyp = (ast.literal_eval(line.split("=", 1)[1]) for line in lines[6:8])
    assert d_ref == d_hyp == ["DON'T", "STOP"]
    assert lines[9] == "e-empty:\thyp=[]"


def test_wer_summary_sorted(tmp_path):
    path = tmp_path / "wer-summary-test-clean.txt"
    write_wer_summary(path, [("mtp-threshold-0.5", 12.345), ("greedy", 10.0), ("mtp-threshold-0.9", 10.5)])
    assert path.read_text(encoding="utf-8") == (
        "settings\tWER\ngreedy\t10.00\nmtp-threshold-0.9\t10.50\nmtp-threshold-0.5\t12.35\n"
    )


def test_bad_results_are_named():
    with pytest.raises(ValueError, match="'a-sub'"):
        compute_error_stats(RESULTS + [("a-sub", "x", "y")])
    with pytest.raises(TypeError, match="result #1"):
        compute_error_stats([("u1", "a", "a"), ("u2", "a", None)])


@pytest.mark.parametrize("write", [
    lambda path, results: write_recogs(path, results),
    lambda path, results: write_error_stats(path, "test", results),
    lambda path, results: write_wer_summary(path, [(cut_id, 1.0) for cut_id, _, _ in results]),
])
def test_failed_write_leaves_old_file(tmp_path, write):
    path = tmp_path / "out.txt"
    path.write_text("old complete file\n", encoding="utf-8")
    # A lone surrogate (e.g. from a badly decoded file name) cannot be encoded, so writing fails part way.
    bad = RESULTS + [("z-\udcff", "a b", "a b")]
    with pytest.raises(UnicodeEncodeError):
        write(path, bad)
    assert path.read_text(encoding="utf-8") == "old complete file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


POINTS = [
    {"label": "greedy", "num_decoder_calls": 1200, "wer": 10.2},
    {"label": "mtp-verify", "num_decoder_calls": 520, "wer": 10.2},
    {"label": "mtp-threshold", "num_decoder_calls": 410, "wer": 12.8, "threshold": 0.5},
    {"label": "mtp-threshold", "num_decoder_calls": 470, "wer": 11.0, "threshold": 0.7},
    {"label": "mtp-threshold", "num_decoder_calls": 560, "wer": 10.4, "threshold": 0.9},
]


def test_plot_is_png(tmp_path):
    path = tmp_path / "tradeoff.png"
    plot_tradeoff(POINTS, path, "demo test set")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tradeoff.png"]


def test_plot_rejects_bad_points(tmp_path):
    with pytest.raises(ValueError, match="point #1 .* lacks key"):
        plot_tradeoff([POINTS[0], {"label": "x", "wer": 3.0}], tmp_path / "p.png", "t")
    with pytest.raises(ValueError, match="no points"):
        plot_tradeoff([], tmp_path / "p.png", "t")
    assert not (tmp_path / "p.png").exists()


def test_plot_failure_leaves_no_file(tmp_path, monkeypatch):
    def half_write(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n partial")
        raise OSError("disk full")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", half_write)
    with pytest.raises(OSError, match="disk full"):
        plot_tradeoff(POINTS, tmp_path / "tradeoff.png", "t")
    assert list(tmp_path.iterdir()) == []


def _sections(text: str) -> dict[str, list[str]]:
    """Errs-file section header -> its lines (sections are separated by blank lines)."""
    blocks = text.split("\n\n")[1:]
    return {block.splitlines()[0]: block.splitlines()[1:] for block in blocks}


def test_results_table_names_settings_and_compares_within_one_model():
    from mtp_asr.decode.summary import add_speedups, method_name

    def row(method, calls, path, **extra):
        return {"test_set": "test", "checkpoint": "epoch-1", "checkpoint_path": path, "batch_size": 16,
                "method": method, "num_decoder_calls": calls, "wall_seconds": calls / 100, **extra}

    assert method_name(row("ctc-verify", 1, "a", max_draft=8, draft_tree="0;1;0.0")) == "ctc-verify D8 tree 3nodes"
    assert method_name(row("ctc", 1, "a", ctc_beam_size=16, lexicon="w.txt")) == "ctc ctcB16 lex"
    assert method_name(row("mtp-verify", 1, "a", num_heads=2, draft_tree="1,1")) == "mtp-verify K2 tree 1x1"
    assert method_name(row("mtp-verify", 1, "a")) == "mtp-verify"
    # Two models whose files share a name (exp/asr/epoch-1.pt, exp/mwer/epoch-1.pt) each against its own greedy.
    rows = add_speedups([row("greedy", 100, "exp/asr/epoch-1.pt"), row("greedy", 50, "exp/mwer/epoch-1.pt"),
                         row("mtp-verify", 25, "exp/asr/epoch-1.pt"), row("mtp-verify", 25, "exp/mwer/epoch-1.pt")])
    assert [r["speedup_calls"] for r in rows[2:]] == [4.0, 2.0]
    # CTC alone makes no decoder call: no call speed-up rather than greedy's calls over none.
    (ctc,) = add_speedups([row("greedy", 100, "a"), row("ctc", 0, "a")])[1:]
    assert ctc["speedup_calls"] is None and ctc["speedup_seconds"] > 0
