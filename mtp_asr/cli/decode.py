"""Decoding commands: `decode`, `benchmark`, `draft-tree`, `transcribe` (thin wrappers over mtp_asr.decode)."""
from pathlib import Path

import click

from mtp_asr.cli import main
from mtp_asr.cli.common import library_call

FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
METHOD_CHOICES = ["ctc", "greedy", "mtp-threshold", "mtp-verify", "ctc-verify", "ctc-rescore", "beam", "mtp-beam",
                  "mtp-beam-verify"]
BEAM_METHODS = ("beam", "mtp-beam", "mtp-beam-verify")
VERIFY_METHODS = ("mtp-verify", "ctc-verify")
CTC_METHODS = ("ctc", "ctc-verify", "ctc-rescore")
CTC_WEIGHT_METHODS = ("ctc-rescore", "beam", "mtp-beam-verify")  # rescoring, and joint CTC/attention beam searches
WORD_LM_METHODS = ("beam", "mtp-beam-verify")  # word n-gram LM fusion
MTP_METHODS = ("mtp-threshold", "mtp-verify", "ctc-verify", "mtp-beam", "mtp-beam-verify")  # using heads 2..K


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


decoder_threads_option = click.option(
    "--decoder-threads", type=click.IntRange(min=0), default=1, show_default=True,
    help="CPU threads of the decoder loop (0: torch's, or benchmark's --num-threads). Its matrix products have a few "
         "rows: a second thread costs more to wake than it saves (egs/synth/asr/RESULTS.md).")


ctc_beam_option = click.option(
    "--ctc-beam-size", type=click.IntRange(min=1),
    help="ctc, ctc-verify, ctc-rescore: the CTC transcript is a prefix beam search of this many prefixes, over "
         "the --lexicon's words when one is given (default 16; 1 without a lexicon: best path); ctc-rescore scores "
         "its final prefixes.")


lexicon_option = click.option(
    "--lexicon", type=FILE,
    help="A word list (one word per line, or Kaldi's words.txt): every method emits only its words, spelled as the "
         "tokenizer spells them (a prefix tree over the tokens masks each head's logits). mtp-verify and ctc-verify "
         "then reproduce greedy decoding with the same lexicon.")


def method_options(fn):
    options = [
        click.option("--method", type=click.Choice(METHOD_CHOICES), default="greedy", show_default=True,
                     help="ctc: the encoder's CTC head alone (its prefix beam search, --ctc-beam-size; no "
                          "decoder call: a baseline); greedy: next-token baseline; mtp-threshold: accept head k's "
                          "token when its probability >= --threshold (lossy); mtp-verify: drafts of heads 2..K "
                          "checked in the next call (same output as greedy); ctc-verify: the encoder's CTC "
                          "transcript drafts the whole output, verified --max-draft tokens per call (same output as "
                          "greedy); ctc-rescore: the "
                          "CTC search's hypotheses scored by the decoder, two calls per utterance (the prompt, then "
                          "every hypothesis at once); the best by --ctc-weight x CTC + (1 - it) x decoder "
                          "log-probability wins (lossy); beam: next-token "
                          "beam search; mtp-beam: prefix-based beam search over the heads' blocks (--threshold as in "
                          "mtp-threshold); mtp-beam-verify: next-token beam search whose hypotheses advance along "
                          "the heads' drafts that head 1 verifies (beam's scores, several tokens per call)."),
        click.option("--max-draft", type=click.IntRange(min=1), default=32, show_default=True,
                     help="ctc-verify: draft tokens verified per decoder call at most."),
        click.option("--draft-branches", type=click.IntRange(min=1),
                     help="ctc-verify: after a correction, the CTC draft from up to this many equally good "
                          "alignments of the output to it (a wrong token or a missing one), verified side by side "
                          "(default 1; 2 saves about 4% of the calls for more positions per call)."),
        click.option("--draft-tree", callback=tree_option,
                     help="mtp-verify, ctc-verify: a tree of head drafts verified in one call (tree attention; same "
                          "output as greedy, fewer calls, more positions per call). Widths per head 2..K, e.g. "
                          "3,2,1: every combination of head 2's top 3, head 3's top 2 and head 4's top 1; or rank "
                          "paths, e.g. 0;1;0.0 (head 2's best and second, and head 3's best after head 2's best), "
                          "as `mtp-asr draft-tree` prints them. Default: a chain of each head's best."),
        click.option("--num-heads", "-K", type=click.IntRange(min=1),
                     help="Heads used by MTP methods (default: all of the model's)."),
        click.option("--beam-size", type=click.IntRange(min=1),
                     help="Beam width of beam and mtp-beam (default 4)."),
        click.option("--length-norm", type=click.FloatRange(min=0),
                     help="Beam methods rank hypotheses by score / length ** this (default 0.5; 1: per-token "
                          "average; 0: plain sum, which favours early EOS)."),
        click.option("--max-tokens-per-second", type=click.FloatRange(min=0, min_open=True), default=30.0,
                     show_default=True,
                     help="Length limit: an output ends after 10 + this x audio seconds tokens without EOS (the "
                          "summary counts them; raise it for tokens faster than that, e.g. characters of fast "
                          "speech at 24 per second)."),
        ctc_beam_option,
        click.option("--ctc-weight", type=click.FloatRange(0, 1),
                     help="The CTC log-probability's weight beside the decoder's: ctc-rescore (default 0.5); beam and "
                          "mtp-beam-verify (default 0): joint CTC/attention beam search, every extension scored by "
                          "both."),
        click.option("--rescore-beam", type=click.IntRange(min=0),
                     help="ctc-rescore: also score the decoder's own N best transcripts, its calls added (1: greedy's, "
                          "found by ctc-verify; N > 1: mtp-beam-verify's N-best with beam N; default 0: none)."),
        click.option("--word-lm", type=FILE,
                     help="beam, mtp-beam-verify (with --lexicon): shallow fusion of a word n-gram LM, an ARPA file "
                          "(`mtp-asr train-ngram`, or any, .gz too); each word's LM log-probability, spread over its "
                          "tokens by look-ahead through the lexicon, is added to the scores x --lm-weight."),
        click.option("--lm-weight", type=click.FloatRange(min=0),
                     help="The word LM's weight (with --word-lm; default 0.5)."),
        decoder_threads_option,
        lexicon_option,
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def tree_option(ctx, param, value):
    """--draft-tree: checked here (widths '3,2,1' or rank paths '0;1;0.0'), kept as text; several (benchmark): a
    list."""
    from mtp_asr.decode.tree_spec import parse_tree

    try:
        for text in value if isinstance(value, tuple) else [value or ""]:
            parse_tree(text)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return list(value) if isinstance(value, tuple) else value


def options_for(methods: tuple, method: str, **options) -> dict:
    """The options that were given (the library's defaults stand for the others); refused for methods other than
    `methods`, where they would silently do nothing."""
    given = {name: value for name, value in options.items() if value is not None}
    if given and method not in methods:
        names = " and ".join([", ".join(methods[:-1]), methods[-1]] if len(methods) > 2 else methods)
        raise click.BadParameter(f"applies to {names} only, not --method {method}",
                                 param_hint=" / ".join(f"--{name.replace('_', '-')}" for name in given))
    return given


def word_lm_options(method: str, word_lm, lm_weight) -> dict:
    if lm_weight is not None and word_lm is None:
        raise click.BadParameter("needs --word-lm", param_hint="--lm-weight")
    return options_for(WORD_LM_METHODS, method, word_lm=word_lm, lm_weight=lm_weight)


@main.command("decode")
@model_options
@method_options
@click.option("--cuts", "manifests", type=FILE, multiple=True, required=True,
              help="Cut manifest with features (cuts_<set>.jsonl.gz); repeatable.")
@click.option("--threshold", "thresholds", type=click.FloatRange(min=0), multiple=True,
              help="tau of mtp-threshold and mtp-beam; repeat for a sweep (default 0.8).")
@click.option("--nbest", type=click.IntRange(min=1),
              help="Beam methods: hypotheses per utterance in the N-best file (default: the beam size).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Utterances per batch (sorted by duration).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Result directory (default: EXP_DIR/<method>, or the checkpoint's directory/<method>).")
@library_call
def decode_cmd(checkpoint, exp_dir, epoch, avg, device, method, num_heads, max_draft, draft_branches, draft_tree,
               beam_size, length_norm, max_tokens_per_second, ctc_beam_size, ctc_weight, rescore_beam, word_lm,
               lm_weight, decoder_threads, lexicon, manifests, thresholds, nbest, batch_size, out_dir):
    """Decode cut sets; write icefall-style results per set and setting.

    In OUT_DIR: recogs-<set>-<suffix>.txt, errs-<set>-<suffix>.txt (alignment, WER, per-utterance, substitutions,
    deletions, insertions, per-word stats), wer-summary-<set>-<suffix>.txt and summary-<set>-<suffix>.json (WER,
    decoder calls, tokens per call, encoder/decoder seconds, RTF). Beam methods also write
    nbest-<set>-<suffix>.jsonl (per utterance the N best hypotheses with total and per-token scores, and the head
    and position that scored each token). A threshold sweep also writes a PNG of WER against decoder calls.
    """
    from mtp_asr.decode.run import resolve_checkpoint, run_decode

    options = {**options_for(BEAM_METHODS, method, beam_size=beam_size, nbest=nbest, length_norm=length_norm),
               **options_for(VERIFY_METHODS, method, draft_tree=draft_tree),
               **options_for(("ctc-verify",), method, draft_branches=draft_branches), "max_draft": max_draft,
               **options_for(CTC_METHODS, method, ctc_beam_size=ctc_beam_size),
               **options_for(CTC_WEIGHT_METHODS, method, ctc_weight=ctc_weight),
               **options_for(("ctc-rescore",), method, rescore_beam=rescore_beam),
               **word_lm_options(method, word_lm, lm_weight),
               "max_tokens_per_second": max_tokens_per_second, "decoder_threads": decoder_threads, "lexicon": lexicon}
    num_heads = options_for(MTP_METHODS, method, num_heads=num_heads).get("num_heads")
    path, n_avg, name = resolve_checkpoint(checkpoint, exp_dir, epoch, avg)
    out_dir = out_dir or path.parent / method
    run_decode(path, n_avg, name, manifests, method, thresholds, num_heads, batch_size, out_dir, device, **options)


@main.command("benchmark")
@model_options
@click.option("--cuts", "manifest", type=FILE, required=True, help="Cut manifest with features.")
@click.option("--batch-sizes", default="1,16", show_default=True, help="Comma-separated batch sizes.")
@click.option("--threshold", "thresholds", type=click.FloatRange(min=0), multiple=True,
              help="Thresholds for the mtp-threshold (and mtp-beam) rows (default 0.8); repeatable.")
@click.option("--max-utts", type=click.IntRange(min=0), default=0, help="Use only the first N cuts (0: all).")
@click.option("--num-threads", type=click.IntRange(min=1), help="torch CPU threads (fixed for fair timing).")
@decoder_threads_option
@lexicon_option
@ctc_beam_option
@click.option("--beam-size", type=click.IntRange(min=1),
              help="Also run beam and mtp-beam (at every threshold) with this beam width.")
@click.option("--ctc-weight", type=click.FloatRange(0, 1, min_open=True),
              help="With --beam-size: also run joint CTC/attention beam and mtp-beam-verify with this CTC weight.")
@click.option("--word-lm", type=FILE,
              help="With --beam-size and --lexicon: also run beam and mtp-beam-verify fused with this ARPA word LM "
                   "(and the CTC head, with --ctc-weight).")
@click.option("--lm-weight", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="The word LM's weight (with --word-lm).")
@click.option("--max-draft", "max_drafts", type=click.IntRange(min=1), multiple=True,
              help="Draft tokens verified per call in the ctc-verify rows (default 32); repeatable. Each call costs "
                   "in proportion to the positions it verifies where compute is the bottleneck (a CPU).")
@click.option("--draft-branches", "draft_branches", type=click.IntRange(min=1), multiple=True,
              help="CTC draft continuations verified after a correction in the ctc-verify rows (default 1); "
                   "repeatable.")
@click.option("--draft-tree", "draft_trees", multiple=True, callback=tree_option,
              help="Also run mtp-verify and ctc-verify with this draft tree (widths, e.g. 3,2,1, or rank paths as "
                   "`mtp-asr draft-tree` prints them); "
                   "repeatable.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Run every method this many times, in turn, and report each one's median seconds (a steadier "
                   "speed-up on a shared machine).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@library_call
def benchmark_cmd(checkpoint, exp_dir, epoch, avg, device, manifest, batch_sizes, thresholds, max_utts, num_threads,
                  decoder_threads, lexicon, ctc_beam_size, beam_size, ctc_weight, word_lm, lm_weight, max_drafts,
                  draft_branches, draft_trees, repeats, out_dir):
    """Greedy vs MTP decoding of one model on one cut set, in one process, after a warm-up.

    Prints a table (WER, decoder calls, tokens/call, decoder seconds, speed-up in calls and seconds versus greedy
    at the same batch size, RTF) and writes OUT_DIR/benchmark.json and benchmark.md. With --beam-size, beam and
    mtp-beam rows follow the greedy-search ones (and with --ctc-weight, joint CTC/attention beam and mtp-beam-verify;
    with --word-lm, both fused with the word LM).
    """
    import torch

    from mtp_asr.decode.run import resolve_checkpoint, run_benchmark

    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b]
    except ValueError:
        raise click.BadParameter(f"{batch_sizes!r} is not a comma-separated list of integers",
                                 param_hint="--batch-sizes")
    if not sizes or min(sizes) < 1:
        raise click.BadParameter("batch sizes must be >= 1", param_hint="--batch-sizes")
    if word_lm and not (beam_size and lexicon):
        raise click.BadParameter("needs --beam-size and --lexicon", param_hint="--word-lm")
    path, n_avg, _ = resolve_checkpoint(checkpoint, exp_dir, epoch, avg)
    run_benchmark(path, n_avg, manifest, sizes, list(thresholds) or [0.8], out_dir, device, max_utts=max_utts,
                  beam_size=beam_size, max_drafts=list(max_drafts) or [32],
                  draft_branches=list(draft_branches) or [1], draft_trees=draft_trees,
                  decoder_threads=decoder_threads, lexicon=lexicon, repeats=repeats, ctc_beam_size=ctc_beam_size,
                  ctc_weight=ctc_weight, word_lm=word_lm, lm_weight=lm_weight)


@main.command("draft-tree")
@model_options
@click.option("--cuts", "manifests", type=FILE, multiple=True, required=True,
              help="Cuts with features to fit the tree on (held-out ones, e.g. dev); repeatable.")
@click.option("--nodes", type=click.IntRange(min=1), default=24, show_default=True,
              help="Draft positions per call: each costs about what a decoder position costs.")
@click.option("--max-cuts", type=click.IntRange(min=1), default=500, show_default=True,
              help="Use a random subset of N cuts at most.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@library_call
def draft_tree_cmd(checkpoint, exp_dir, epoch, avg, device, manifests, nodes, max_cuts, batch_size):
    """Print the draft tree of --nodes nodes that the model's heads get accepted most often on the cuts.

    The output is `--draft-tree` text for decode, benchmark and transcribe (rank paths: 0;1;0.0 are head 2's best
    and second tokens, and head 3's best after head 2's best). Logs the estimated tokens per verification call of
    this tree, of other sizes and of product trees (see mtp_asr/decode/tree_fit.py).
    """
    from mtp_asr.decode.run import resolve_checkpoint
    from mtp_asr.decode.tree_fit import fit_tree
    from mtp_asr.utils import pick_device

    path, n_avg, _ = resolve_checkpoint(checkpoint, exp_dir, epoch, avg)
    spec, _ = fit_tree(path, manifests, nodes, batch_size, max_cuts, avg=n_avg, device=pick_device(device))
    click.echo(spec)


@main.command("transcribe")
@model_options
@method_options
@click.option("--threshold", type=click.FloatRange(min=0), default=0.8, show_default=True,
              help="tau of mtp-threshold and mtp-beam.")
@click.argument("files", type=FILE, nargs=-1, required=True)
@library_call
def transcribe_cmd(checkpoint, exp_dir, epoch, avg, device, method, num_heads, max_draft, draft_branches, draft_tree,
                   beam_size, length_norm, max_tokens_per_second, ctc_beam_size, ctc_weight, rescore_beam, word_lm,
                   lm_weight, decoder_threads, lexicon, threshold, files):
    """Print `FILE<TAB>transcript` for each audio file (wav, flac, ogg, mp3; any sample rate; mono or stereo)."""
    from mtp_asr.decode.run import resolve_checkpoint, transcribe_files
    from mtp_asr.decode.runner import DecodeSettings

    num_heads = options_for(MTP_METHODS, method, num_heads=num_heads).get("num_heads")
    settings = DecodeSettings(method, threshold, num_heads, max_draft=max_draft, decoder_threads=decoder_threads,
                              lexicon=lexicon, max_tokens_per_second=max_tokens_per_second,
                              **options_for(VERIFY_METHODS, method, draft_tree=draft_tree),
                              **options_for(("ctc-verify",), method, draft_branches=draft_branches),
                              **options_for(CTC_METHODS, method, ctc_beam_size=ctc_beam_size),
                              **options_for(CTC_WEIGHT_METHODS, method, ctc_weight=ctc_weight),
                              **options_for(("ctc-rescore",), method, rescore_beam=rescore_beam),
                              **word_lm_options(method, word_lm, lm_weight),
                              **options_for(BEAM_METHODS, method, beam_size=beam_size, length_norm=length_norm))
    path, n_avg, _ = resolve_checkpoint(checkpoint, exp_dir, epoch, avg)
    for name, text in transcribe_files(path, n_avg, files, settings, device):
        click.echo(f"{name}\t{text}")
