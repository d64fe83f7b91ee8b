"""Result files of a decode, icefall-style, plus a JSON summary with the speed figures and the sweep plot."""
import json
from pathlib import Path
from typing import Sequence

from mtp_asr.decode.runner import DecodeResult
from mtp_asr.plot import plot_tradeoff
from mtp_asr.score import write_error_stats, write_recogs, write_wer_summary
from mtp_asr.utils import atomic_write_text


def write_results(out_dir, test_set: str, suffix: str, result: DecodeResult, extra: dict = None) -> dict:
    """recogs-, errs-, wer-summary- and summary-<set>-<suffix> files, and for beam methods nbest-<set>-<suffix>.jsonl;
    returns the summary (with `wer`)."""
    out_dir = Path(out_dir)
    stats = write_error_stats(out_dir / f"errs-{test_set}-{suffix}.txt", f"{test_set}-{suffix}", result.results)
    write_recogs(out_dir / f"recogs-{test_set}-{suffix}.txt", result.results)
    write_wer_summary(out_dir / f"wer-summary-{test_set}-{suffix}.txt", [(suffix, stats.wer)])
    if result.settings.is_beam:
        write_nbest(out_dir / f"nbest-{test_set}-{suffix}.jsonl", result)
    summary = {"test_set": test_set, "suffix": suffix, "wer": round(stats.wer, 4), **result.summary(),
               "errors": stats.as_dict(), **(extra or {})}
    atomic_write_text(out_dir / f"summary-{test_set}-{suffix}.json", json.dumps(summary, indent=2) + "\n")
    return summary


def write_sweep_plot(path, summaries: Sequence[dict], title: str) -> None:
    points = [{"label": s["method"], "num_decoder_calls": s["num_decoder_calls"], "wer": s["wer"],
               **({"threshold": s["threshold"]} if s.get("threshold") is not None else {})} for s in summaries]
    plot_tradeoff(points, Path(path), title)


def write_nbest(path, result: DecodeResult) -> None:
    """One JSON line per utterance, sorted by cut id: cut_id, ref, decoder_calls and the hypotheses, best first,
    each with text, tokens, score, norm_score, finished and per scored token (EOS last when finished) its
    log-probability, head and position (see mtp_asr.decode.beam)."""
    lines = []
    for cut_id, ref, _ in sorted(result.results, key=lambda r: r[0]):
        entry = {"cut_id": cut_id, "ref": ref, "decoder_calls": result.calls[cut_id], "hyps": result.nbest[cut_id]}
        lines.append(json.dumps(entry) + "\n")
    atomic_write_text(path, "".join(lines))
