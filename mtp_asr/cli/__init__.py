"""The `mtp-asr` command line: thin click wrappers around library code, one module per concern."""
import click

@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main():
    """mtp_asr: Speech-LLaMA ASR with multi-token-prediction decoding."""

from mtp_asr.cli import data  # noqa: E402,F401  (registers the data commands)
from mtp_asr.cli import train  # noqa: E402,F401  (registers the training commands)
from mtp_asr.cli import decode  # noqa: E402,F401  (registers the decoding commands)
from mtp_asr.cli import results  # noqa: E402,F401  (registers summarize)
