"""The `mtp-asr` command line: thin click wrappers around library code, one module per concern."""
import os

# OpenMP threads that spin while waiting turn any oversubscription (two jobs on two cores, torchrun ranks, a test
# suite beside a training run) into 20-100x slowdowns on small CPU ops (measured). Passive waiting costs about 100 us
# per parallel op to wake a thread: nothing next to training's large ops, too much for a decoder loop's small ones,
# which therefore run on one thread (DecodeSettings.decoder_threads). Set before torch (imported lazily by the
# commands) starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main():
    """mtp_asr: Speech-LLaMA ASR with multi-token-prediction decoding."""

from mtp_asr.cli import data  # noqa: E402,F401  (registers the data commands)
from mtp_asr.cli import train  # noqa: E402,F401  (registers the training commands)
from mtp_asr.cli import decode  # noqa: E402,F401  (registers the decoding commands)
from mtp_asr.cli import results  # noqa: E402,F401  (registers summarize)
