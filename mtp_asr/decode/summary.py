"""The results table of a recipe: every `summary-*.json` under some directories, one row per (test set, method,
setting), with the speed-up against greedy decoding of the same model, test set and batch size."""
import json
from pathlib import Path
from typing import Sequence

from mtp_asr.decode.tree_spec import tree_name
from mtp_asr.utils import atomic_write_text

COLUMNS = ("test_set", "method", "threshold", "beam_size", "wer", "num_decoder_calls", "tokens_per_call",
           "decoder_seconds", "wall_seconds", "speedup_calls", "speedup_seconds", "rtf")


def collect(dirs: Sequence[Path]) -> list:
    rows = []
    for d in dirs:
        for path in sorted(Path(d).rglob("summary-*.json")):
            s = json.loads(path.read_text(encoding="utf-8"))
            s["wall_seconds"] = round(s["encoder_seconds"] + s["decoder_seconds"], 4)
            s["file"] = str(path)
            rows.append(s)
    return rows


def _group(s: dict) -> tuple:
    """Runs comparable to each other: same test set, model file, batch size and lexicon (summaries before the
    model's path was recorded: its name)."""
    return (s["test_set"], s.get("checkpoint_path") or s.get("checkpoint", ""), s.get("batch_size"),
            s.get("lexicon") or "")


def add_speedups(rows: list) -> list:
    """Greedy's decoder calls and seconds over each row's; no call speed-up for rows without decoder calls (ctc)."""
    greedy = {_group(s): s for s in rows if s["method"] == "greedy"}
    for s in rows:
        base = greedy.get(_group(s))
        s["speedup_calls"] = round(base["num_decoder_calls"] / s["num_decoder_calls"], 3) \
            if base and s["num_decoder_calls"] else None
        s["speedup_seconds"] = round(base["wall_seconds"] / max(s["wall_seconds"], 1e-9), 3) if base else None
    return rows


def tree_text(s: dict) -> str:
    """A summary's draft tree as `--draft-tree` text ('' for a chain); summaries before node lists held widths."""
    tree = s.get("draft_tree") or ""
    return tree if isinstance(tree, str) else ",".join(map(str, tree))


def method_name(s: dict) -> str:
    """The method with the settings the other columns do not show: heads used when fewer than the model's, the CTC
    draft length and branches, the CTC beam and weight, a word LM's weight, the draft tree, a lexicon (e.g.
    `ctc-verify D8 br2 ctcB16 tree 24nodes`, `mtp-verify K2`, `beam ctc0.5 lm0.5 lex`, `greedy lex`)."""
    tree = tree_name(tree_text(s))
    return (s["method"] + (f" K{s['num_heads']}" if s.get("num_heads") else "")
            + (f" D{s['max_draft']}" if s.get("max_draft") else "")
            + (f" br{s['draft_branches']}" if (s.get("draft_branches") or 1) > 1 else "")
            + (f" ctcB{s['ctc_beam_size']}" if s.get("ctc_beam_size") else "")
            + (_ctc_weight(s) if s.get("ctc_weight") is not None else "")
            + (f" lm{s['lm_weight']:g}" if s.get("word_lm") else "")
            + (f" +B{s['rescore_beam']}" if s.get("rescore_beam") else "")
            + (f" tree {tree}" if tree else "")
            + (" lex" if s.get("lexicon") else ""))


def _ctc_weight(s: dict) -> str:
    """ctc-rescore's weight (`w0.5`), or a beam search's joint CTC weight (`ctc0.5`)."""
    return f" w{s['ctc_weight']:g}" if s["method"] == "ctc-rescore" else f" ctc{s['ctc_weight']:g}"


def markdown(rows: list) -> str:
    head = ("| test set | model | method | tau | beam | WER % | decoder calls | tokens/call | decoder s | wall s | "
            "speed-up (calls) | speed-up (wall) | RTF |")
    lines = [head, "|" + "---|" * 13]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    times = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    for s in rows:
        cells = [s["test_set"], s.get("checkpoint") or "-", method_name(s), fmt(s.get("threshold"), "g"),
                 fmt(s.get("beam_size"), "d"), f"{s['wer']:.2f}", s["num_decoder_calls"],
                 fmt(s["tokens_per_call"], ".2f"), f"{s['decoder_seconds']:.2f}", f"{s['wall_seconds']:.2f}",
                 times(s["speedup_calls"]), times(s["speedup_seconds"]), f"{s['rtf']:.4f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def summarize(dirs: Sequence[Path], out: Path) -> str:
    """Write OUT (JSON rows) and OUT with .md (the table); return the table."""
    rows = collect(dirs)
    if not rows:
        raise FileNotFoundError(f"no summary-*.json files under {', '.join(map(str, dirs))}")
    order = {"ctc": -1, "greedy": 0, "mtp-threshold": 1, "mtp-verify": 2, "ctc-verify": 3, "ctc-rescore": 4, "beam": 5,
             "mtp-beam": 6, "mtp-beam-verify": 7}
    rows.sort(key=lambda s: (s["test_set"], s.get("checkpoint", ""), s.get("lexicon") or "",
                             order.get(s["method"], 9), tree_text(s), s.get("threshold") or 0, s.get("beam_size") or 0,
                             s.get("lm_weight") or 0))
    add_speedups(rows)
    out = Path(out)
    keys = COLUMNS + ("checkpoint", "batch_size", "max_draft", "draft_branches", "ctc_beam_size", "ctc_weight",
                      "word_lm", "lm_weight", "rescore_beam", "draft_tree", "lexicon", "num_utts", "num_tokens", "file")
    atomic_write_text(out, json.dumps([{k: s.get(k) for k in keys} for s in rows], indent=2) + "\n")
    table = markdown(rows)
    atomic_write_text(out.with_suffix(".md"), table + "\n")
    return table
