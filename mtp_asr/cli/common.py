"""What every command shares: logging, and library errors shown as one clear line instead of a traceback."""
import functools
import os

import click

from mtp_asr.utils import setup_logging


def _user_errors() -> tuple:
    """Errors that mean bad input (a file, an option, a config), not a bug. Imported lazily: they pull in torch."""
    from mtp_asr.data import PreparationError
    from mtp_asr.train.checkpoint import CheckpointError
    from mtp_asr.train.trainer import TrainingError

    return PreparationError, CheckpointError, TrainingError, FileNotFoundError, ValueError


def library_call(fn):
    """Set up logging and turn input errors into a ClickException (exit code 1, message naming the culprit).
    MTP_ASR_DEBUG=1 shows the full traceback instead."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        setup_logging()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if os.environ.get("MTP_ASR_DEBUG") or not isinstance(e, _user_errors()):
                raise
            raise click.ClickException(str(e)) from e

    return wrapper
