"""`mtp-asr summarize`: the results table of a recipe."""
from pathlib import Path

import click

from mtp_asr.cli import main
from mtp_asr.cli.common import library_call


@main.command("summarize")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="JSON file of rows; the markdown table goes beside it (.md).")
@library_call
def summarize_cmd(dirs, out):
    """Collect every summary-*.json under DIRS into one table: WER, decoder calls, tokens per call, seconds and
    speed-up versus greedy decoding of the same model, test set and batch size."""
    from mtp_asr.decode.summary import summarize

    click.echo(summarize(dirs, out))
