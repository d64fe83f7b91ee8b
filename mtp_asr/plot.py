"""The speed/accuracy figure: WER against decoder calls for a threshold sweep and reference methods."""
import math
import numbers
from pathlib import Path
from typing import Sequence

# The Agg canvas renders PNGs without a display and without pyplot's global state.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mtp_asr.utils import atomic_path

_REQUIRED = ("label", "num_decoder_calls", "wer")


def plot_tradeoff(points: Sequence[dict], path, title: str) -> None:
    """Write a PNG of WER (y) against decoder calls (x).

    Each point is a dict with `label`, `num_decoder_calls`, `wer` and optionally `threshold`. Points sharing a label
    form one series (a sweep is joined by a line in order of decoder calls); points with a threshold are annotated
    with it.
    """
    _check_points(points, path)
    series: dict[str, list[dict]] = {}
    for point in points:
        series.setdefault(str(point["label"]), []).append(point)

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, members in series.items():
        members = sorted(members, key=lambda p: p["num_decoder_calls"])
        xs = [p["num_decoder_calls"] for p in members]
        ys = [p["wer"] for p in members]
        ax.plot(xs, ys, "o-" if len(members) > 1 else "s", label=label, markersize=5)
        for p in members:
            if p.get("threshold") is not None:
                ax.annotate(f"τ={p['threshold']:g}", (p["num_decoder_calls"], p["wer"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.margins(0.08)  # keep edge points and their labels off the frame
    ax.set_xlabel("decoder calls (fewer is faster)")
    ax.set_ylabel("WER (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _check_points(points: Sequence[dict], path) -> None:
    if not points:
        raise ValueError(f"plot {path}: no points to plot")
    for index, point in enumerate(points):
        missing = [key for key in _REQUIRED if key not in point]
        if missing:
            raise ValueError(f"plot {path}: point #{index} {point!r} lacks key(s) {', '.join(missing)}")
        for key in ("num_decoder_calls", "wer"):
            value = point[key]
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"plot {path}: point #{index} ({point['label']}) has {key}={value!r}, not a number")
    if Path(path).suffix.lower() != ".png":
        raise ValueError(f"plot {path}: the figure is a PNG, so the file name must end in .png")
