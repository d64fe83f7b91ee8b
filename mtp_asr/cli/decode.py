"""Decoding commands: `decode`, `benchmark`, `transcribe` (thin wrappers over mtp_asr.decode)."""
from pathlib import Path

import click

from mtp_asr.cli import main
from mtp_asr.cli.common import library_call

FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
METHOD_CHOICES = ["greedy", "mtp-threshold", "mtp-verify"]


def model_options(fn):
    options = [
        click.option("--checkpoint", type=FILE, help="A checkpoint (epoch-N.pt, checkpoint-S.pt, avg-*.pt)."),
        click.option("--exp-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="With --epoch/--avg: average epoch files of this experiment."),
        click.option("--epoch", type=click.IntRange(min=1), help="Last epoch (with --exp-dir)."),
        click.option("--avg", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Number of epochs averaged (with --exp-dir/--epoch)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def method_options(fn):
    options = [
        click.option("--method", type=click.Choice(METHOD_CHOICES), default="greedy", show_default=True,
                     help="greedy: next-token baseline; mtp-threshold: accept head k's token when its probability "
                          ">= --threshold (lossy); mtp-verify: drafts of heads 2..K checked in the next call "
                          "(same output as greedy)."),
        click.option("--num-heads", "-K", type=click.IntRange(min=1),
                     help="Heads used by MTP methods (default: all of the model's)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command("decode")
@model_options
@method_options
@click.option("--cuts", "manifests", type=FILE, multiple=True, required=True,
              help="Cut manifest with features (cuts_<set>.jsonl.gz); repeatable.")
@click.option("--threshold", "thresholds", type=click.FloatRange(min=0), multiple=True,
              help="mtp-threshold's tau; repeat for a sweep (default 0.8).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Utterances per batch (sorted by duration).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Result directory (default: EXP_DIR/<method>, or the checkpoint's directory/<method>).")
@library_call
def decode_cmd(checkpoint, exp_dir, epoch, avg, device, method, num_heads, manifests, thresholds, batch_size, out_dir):
    """Decode cut sets; write icefall-style results per set and setting.

    In OUT_DIR: recogs-<set>-<suffix>.txt, errs-<set>-<suffix>.txt (alignment, WER, per-utterance, substitutions,
    deletions, insertions, per-word stats), wer-summary-<set>-<suffix>.txt and summary-<set>-<suffix>.json (WER,
    decoder calls, tokens per call, encoder/decoder seconds, RTF). A threshold sweep also writes a PNG of WER
    against decoder calls.
    """
    from mtp_asr.decode.run import resolve_checkpoint, run_decode

    path, n_avg, name = resolve_checkpoint(checkpoint, exp_dir, epoch, avg)
    out_dir = out_dir or path.parent / method
    run_decode(path, n_avg, name, manifests, method, thresholds, num_heads, batch_size, out_dir, device)


@main.command("benchmark")
@model_options
@click.option("--cuts", "manifest", type=FILE, required=True, help="Cut manifest with features.")
@click.option("--batch-sizes", default="1,16", show_default=True, help="Comma-separated batch sizes.")
@click.option("--threshold", "thresholds", type=click.FloatRange(min=0), multiple=True,
              help="Thresholds for mtp-threshold rows (default 0.8); repeatable.")
@click.option("--max-utts", type=click.IntRange(min=0), default=0, help="Use only the first N cuts (0: all).")
@click.option("--num-threads", type=click.IntRange(min=1), help="torch CPU threads (fixed for fair timing).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@library_call
def benchmark_cmd(checkpoint, exp_dir, epoch, avg, device, manifest, batch_sizes, thresholds, max_utts, num_threads,
                  out_dir):
    """Greedy vs MTP decoding of one model on one cut set, in one process, after a warm-up.

    Prints a table (WER, decoder calls, tokens/call, decoder seconds, speed-up in calls and seconds versus greedy
    at the same batch size, RTF) and writes OUT_DIR/benchmark.json and benchmark.md.
    """
    import torch

    from mtp_asr.decode.run import resolve_checkpoint, run_benchmark

    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b]
    except ValueError:
        raise click.BadParameter(f"{batch_sizes!r} is not a comma-separated list of integers", param_hint="--batch-sizes")
    if not sizes or min(sizes) < 1:
        raise click.BadParameter("batch sizes must be >= 1", param_hint="--batch-sizes")
    path, n_avg, _ = resolve_checkpoint(checkpoint, exp_dir, epoch, avg)
    run_benchmark(path, n_avg, manifest, sizes, list(thresholds) or [0.8], out_dir, device, max_utts=max_utts)


@main.command("transcribe")
@model_options
@method_options
@click.option("--threshold", type=click.FloatRange(min=0), default=0.8, show_default=True, help="mtp-threshold's tau.")
@click.argument("files", type=FILE, nargs=-1, required=True)
@library_call
def transcribe_cmd(checkpoint, exp_dir, epoch, avg, device, method, num_heads, threshold, files):
    """Print `FILE<TAB>transcript` for each audio file (wav, flac, ogg, mp3; any sample rate; mono or stereo)."""
    from mtp_asr.decode.run import resolve_checkpoint, transcribe_files
    from mtp_asr.decode.runner import DecodeSettings

    path, n_avg, _ = resolve_checkpoint(checkpoint, exp_dir, epoch, avg)
    for name, text in transcribe_files(path, n_avg, files, DecodeSettings(method, threshold, num_heads), device):
        click.echo(f"{name}\t{text}")
