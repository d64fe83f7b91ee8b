"""Data commands: `prepare librispeech|kaldi|synth`, `compute-fbank`, `train-bpe` (thin wrappers over mtp_asr.data)."""
import itertools
from pathlib import Path

import click

from mtp_asr.cli import main
from mtp_asr.cli.common import library_call

DIR = click.Path(exists=True, file_okay=False, path_type=Path)
OUT = click.Path(file_okay=False, path_type=Path)
# Library modules are imported inside the commands: they pull in lhotse and torch, which `mtp-asr --help` need not.
jobs_option = click.option(
    "--jobs", "-j", default=2, show_default=True, type=click.IntRange(min=1), help="Parallel jobs (processes/threads)."
)


def comma_list(ctx, param, value):
    return [v for v in value.split(",") if v] if value else None


@main.group()
def prepare():
    """Corpus -> Lhotse CutSets OUT_DIR/cuts_<split>.jsonl.gz, with OUT_DIR/prepare-report-<split>.txt.

    Transcripts are normalised (upper case, digits, inner apostrophes). Audio that is missing, unreadable,
    truncated or empty is skipped; audio at other rates or with several channels becomes 16 kHz mono. The report lists
    every skip and change.
    """


@prepare.command("librispeech")
@click.argument("corpus_dir", type=DIR)
@click.argument("out_dir", type=OUT)
@jobs_option
@library_call
def prepare_librispeech_cmd(corpus_dir, out_dir, jobs):
    """Every standard LibriSpeech part (dev-clean, train-clean-100, ...) found in CORPUS_DIR.

    CORPUS_DIR is the LibriSpeech directory itself or its parent. Writes OUT_DIR/cuts_<part>.jsonl.gz.
    """
    from mtp_asr.data.prepare import prepare_librispeech

    prepare_librispeech(corpus_dir, out_dir, jobs=jobs)


@prepare.command("kaldi")
@click.argument("data_dir", type=DIR)
@click.argument("out_dir", type=OUT)
@click.option("--split", help="Split name for the output files [default: basename of DATA_DIR].")
@jobs_option
@library_call
def prepare_kaldi_cmd(data_dir, out_dir, split, jobs):
    """A Kaldi data dir: wav.scp (paths or `command |` pipes), text, optional utt2spk and segments.

    Writes OUT_DIR/cuts_<split>.jsonl.gz. Relative audio paths are relative to the current directory.
    """
    from mtp_asr.data.prepare import prepare_kaldi

    prepare_kaldi(data_dir, out_dir, split=split, jobs=jobs)


@prepare.command("synth")
@click.argument("out_dir", type=OUT)
@click.option(
    "--hours", default=0.8, show_default=True, type=click.FloatRange(min=0, min_open=True),
    help="Hours of audio to synthesise.",
)  # fmt: skip
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed (voices, sentences, effects).")
@jobs_option
@click.option("--engines", callback=comma_list, help="Comma-separated TTS engines to use [default: the generator's].")
@click.option("--words", type=click.IntRange(min=10),
              help="Vocabulary: sentences may use only the N most frequent words [default: the generator's, 800].")
@library_call
def prepare_synth_cmd(out_dir, hours, seed, jobs, engines, words):
    """The demo corpus: text-to-speech from several offline engines, held-out voices for test_unseen_voice.

    Generates Kaldi data dirs under OUT_DIR/corpus/{train,dev,test,test_unseen_voice} (with stats.json and
    lm_text.txt), then prepares each into OUT_DIR/cuts_<split>.jsonl.gz.
    """
    from mtp_asr.data.synth import prepare_synth

    prepare_synth(out_dir, hours, seed=seed, jobs=jobs, engines=engines, words=words)


@main.command("compute-fbank")
@click.argument("in_dir", type=DIR)
@click.argument("out_dir", type=OUT)
@click.option(
    "--splits", callback=comma_list, help="Comma-separated splits [default: every IN_DIR/cuts_<split>.jsonl.gz]."
)
@jobs_option
@library_call
def compute_fbank_cmd(in_dir, out_dir, splits, jobs):
    """80-dim log-mel fbank (10 ms shift, lilcom-compressed) for prepared CutSets.

    Writes OUT_DIR/cuts_<split>.jsonl.gz with the arrays under OUT_DIR/feats_<split>/.
    """
    from mtp_asr.data.fbank import compute_fbank

    compute_fbank(in_dir, out_dir, splits=splits, jobs=jobs)


@main.command("train-bpe")
@click.argument("cuts", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_dir", type=OUT)
@click.option("--vocab-size", default=500, show_default=True, type=click.IntRange(min=4), help="Number of pieces.")
@click.option("--model-type", default="bpe", show_default=True, type=click.Choice(["bpe", "unigram", "char", "word"]))
@click.option("--extra-text", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text file whose lines (normalised) are added to the training text; repeatable.")  # fmt: skip
@library_call
def train_bpe_cmd(cuts, out_dir, vocab_size, model_type, extra_text):
    """A sentencepiece model from the transcripts of the CUTS manifests -> OUT_DIR/tokenizer.model (+ .vocab).

    Ids unk=0, bos=1, eos=2 (as LLaMA), no pad piece. The same inputs give the same model.
    """
    from mtp_asr.data.tokenizer import manifest_texts, text_file_lines, train_bpe

    texts = itertools.chain(manifest_texts(cuts), *(text_file_lines(p) for p in extra_text))
    train_bpe(texts, out_dir, vocab_size=vocab_size, model_type=model_type)


@main.command("train-ngram")
@click.argument("texts", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--order", default=3, show_default=True, type=click.IntRange(min=1), help="n of the n-grams.")
@library_call
def train_ngram_cmd(texts, out, order):
    """A word n-gram LM from TEXTS (one sentence per line, normalised as transcripts are) -> OUT, an ARPA file
    (gzip if it ends in .gz), by interpolated modified Kneser-Ney: `decode --word-lm` fuses it into beam searches."""
    from mtp_asr.data.tokenizer import text_file_lines
    from mtp_asr.ngram import train_kneser_ney
    from mtp_asr.utils import logger

    sentences = [line.split() for path in texts for line in text_file_lines(path)]
    lm = train_kneser_ney(sentences, order, name=", ".join(map(str, texts)))
    lm.write_arpa(out)
    counts = [sum(len(g) == n for g in lm.prob) for n in range(1, order + 1)]
    logger.info("%s: %d-gram LM of %d sentences, %d words; n-grams per order %s", out, order, len(sentences),
                sum(map(len, sentences)), counts)
