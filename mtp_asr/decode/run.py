"""What `mtp-asr decode`, `benchmark` and `transcribe` do, as library functions."""
import json
import logging
import platform
import re
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from mtp_asr.data.dataset import read_cuts
from mtp_asr.decode.report import write_results, write_sweep_plot
from mtp_asr.decode.runner import JOINT_METHODS, DecodeSettings, decode_batch, decode_cuts, spelling_tokenizer
from mtp_asr.model.build import load_speech_model
from mtp_asr.model.encoder import MIN_FRAMES
from mtp_asr.score import compute_error_stats
from mtp_asr.utils import atomic_write_text, pick_device

logger = logging.getLogger("mtp_asr")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def set_name(manifest) -> str:
    """`cuts_test-clean.jsonl.gz` -> `test-clean`."""
    name = Path(manifest).name
    m = re.fullmatch(r"(?:.*_)?cuts_(.+?)\.jsonl(?:\.gz)?", name) or re.fullmatch(r"(.+?)\.jsonl(?:\.gz)?", name)
    return m.group(1) if m else Path(manifest).stem


def resolve_checkpoint(checkpoint: Optional[Path], exp_dir: Optional[Path], epoch: Optional[int], avg: int
                       ) -> tuple[Path, int, str]:
    """(checkpoint file, epochs to average, name for result suffixes) from --checkpoint or --exp-dir/--epoch/--avg."""
    if checkpoint is not None:
        if exp_dir is not None or epoch is not None or avg != 1:
            raise ValueError("--checkpoint names one model file: --exp-dir, --epoch and --avg go without it (they "
                             "average epoch-N.pt files of an experiment directory)")
        return Path(checkpoint), 1, Path(checkpoint).stem
    if exp_dir is None or epoch is None:
        raise ValueError("give --checkpoint, or --exp-dir with --epoch (and optionally --avg)")
    return Path(exp_dir) / f"epoch-{epoch}.pt", avg, f"epoch-{epoch}-avg-{avg}"


def eval_cuts(manifest: Path):
    """A cut set to decode: refused when empty or when two cuts share an id (their results would be one)."""
    cuts = read_cuts(manifest)
    if not len(cuts):
        raise ValueError(f"cut manifest {manifest} holds no cuts")
    seen = set()
    for cut in cuts:
        if cut.id in seen:
            raise ValueError(f"cut manifest {manifest}: cut id {cut.id!r} occurs more than once")
        seen.add(cut.id)
    return cuts


def settings_list(method: str, thresholds: Sequence[float], num_heads: Optional[int], **options) -> list:
    """One DecodeSettings per threshold for the methods that take one (default 0.8), else one. options: other fields
    of DecodeSettings (beam_size, nbest, length_norm, max_draft, draft_branches) that differ from their defaults."""
    if method in ("mtp-threshold", "mtp-beam"):
        return [DecodeSettings(method, t, num_heads, **options) for t in (thresholds or [0.8])]
    return [DecodeSettings(method, 1.0, num_heads, **options)]


def check_decoded(result, manifest, total: int) -> None:
    """Refuse a result that decoded nothing (a WER of 0% over no utterance would look perfect); warn about skips."""
    if not result.results:
        raise ValueError(f"nothing of {manifest} was decoded: {result.num_skipped} of its {total} cuts were skipped "
                         f"(see the warnings above)")
    if result.num_skipped:
        logger.warning("%s: %d of %d cuts skipped (see the warnings above); the WER covers the other %d",
                       manifest, result.num_skipped, total, len(result.results))


def reference_point(model, tokenizer, cuts, settings: DecodeSettings, batch_size: int, checkpoint: Path,
                    summary_path: Path) -> dict:
    """WER and decoder calls of a reference method for a sweep's plot: from the summary that `decode` wrote for it
    (beside this method's directory, as recipes lay them out) when it is newer than the checkpoint, else decoded."""
    if summary_path.is_file() and summary_path.stat().st_mtime >= Path(checkpoint).stat().st_mtime:
        done = json.loads(summary_path.read_text(encoding="utf-8"))
        calls, wer = done["num_decoder_calls"], done["wer"]
    else:
        ref = decode_cuts(model, tokenizer, cuts, settings, batch_size, desc=f"{summary_path.stem} (plot reference)")
        calls, wer = ref.num_decoder_calls, round(compute_error_stats(ref.results).wer, 4)
    return {"method": settings.method, "threshold": None, "num_decoder_calls": calls, "wer": wer}


def run_decode(checkpoint: Path, avg: int, ckpt_name: str, manifests: Sequence[Path], method: str,
               thresholds: Sequence[float], num_heads: Optional[int], batch_size: int, out_dir: Path,
               device: str = "auto", **options) -> list:
    names = {}
    for manifest in manifests:  # result files are named by set: two manifests of one name would overwrite each other
        other = names.setdefault(set_name(manifest), manifest)
        if other != manifest:
            raise ValueError(f"--cuts {other} and {manifest} are both the set {set_name(manifest)!r}: their results "
                             f"would overwrite each other; decode them into different --out-dir")
    dev = pick_device(device)
    model, tokenizer, _ = load_speech_model(checkpoint, dev, avg=avg)
    out_dir = Path(out_dir)
    summaries = []
    for manifest in manifests:
        cuts = eval_cuts(manifest)
        test_set = set_name(manifest)
        sweep = []
        for settings in settings_list(method, thresholds, num_heads, **options):
            result = decode_cuts(model, tokenizer, cuts, settings, batch_size, desc=test_set)
            check_decoded(result, manifest, len(cuts))
            suffix = f"{ckpt_name}-{settings.label()}-bs{batch_size}"
            summary = write_results(out_dir, test_set, suffix, result, {"batch_size": batch_size,
                                                                        "checkpoint": ckpt_name,
                                                                        "checkpoint_path": str(checkpoint),
                                                                        "device": device_name(dev)})
            logger.info("%s %s: WER %.2f%%, %d decoder calls, %s tokens/call, RTF %.4f", test_set, suffix,
                        summary["wer"], summary["num_decoder_calls"], summary["tokens_per_call"] or "-",
                        summary["rtf"])
            sweep.append(summary)
        if len(sweep) > 1:
            # References: greedy, and for mtp-beam the next-token beam search of the same width.
            lexicon = options.get("lexicon") or ""
            refs = [DecodeSettings("greedy", lexicon=lexicon)]
            if method == "mtp-beam":
                beam = {k: v for k, v in options.items() if k in ("beam_size", "nbest", "length_norm")}
                refs.append(DecodeSettings("beam", lexicon=lexicon, **beam))
            points = []
            for ref_settings in refs:
                done = (out_dir.parent / ref_settings.method /
                        f"summary-{test_set}-{ckpt_name}-{ref_settings.label()}-bs{batch_size}.json")
                points.append(reference_point(model, tokenizer, cuts, ref_settings, batch_size, checkpoint, done))
            name = re.sub(r"-tau[^-]+", "", settings.label())  # every setting but the swept threshold
            write_sweep_plot(out_dir / f"tradeoff-{test_set}-{ckpt_name}-{name}-bs{batch_size}.png", sweep + points,
                             f"{test_set}: WER vs decoder calls ({ckpt_name})")
        summaries += sweep
    return summaries


def run_benchmark(checkpoint: Path, avg: int, manifest: Path, batch_sizes: Sequence[int], thresholds: Sequence[float],
                  out_dir: Path, device: str = "auto", warmup_utts: int = 4, max_utts: int = 0,
                  beam_size: Optional[int] = None, max_drafts: Sequence[int] = (32,),
                  draft_branches: Sequence[int] = (1,), draft_trees: Sequence[str] = (), decoder_threads: int = 1,
                  lexicon: Optional[Path] = None, repeats: int = 1, ctc_beam_size: Optional[int] = None,
                  ctc_weight: Optional[float] = None, word_lm: Optional[Path] = None,
                  lm_weight: float = DecodeSettings.lm_weight) -> list:
    """Every method at every batch size on one cut set, greedy first at each batch size, speed-ups versus that
    greedy run; `mtp-verify` and `ctc-verify` (for a model with a CTC head, at every draft length in `max_drafts` and
    number of branches in `draft_branches`) with a chain of head drafts and with each of `draft_trees`, and
    `ctc-rescore` (the CTC searches with `ctc_beam_size` prefixes, default DecodeSettings'); `beam` and
    `mtp-beam` (at every threshold) too when a beam size is given, and with `ctc_weight` joint CTC/attention `beam`
    and `mtp-beam-verify`, and with `word_lm` (and a lexicon) both again fused with it. With `repeats` > 1 the
    whole list of methods runs that many times in turn and each method's seconds are the median over the rounds: on
    a shared machine whose speed drifts by 10-20% within minutes, a drift then slows every method alike. With a
    lexicon every row is constrained by it (greedy too, so "same as greedy" still compares like with like). Writes
    benchmark.json and benchmark.md; returns the rows."""
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1 (got {repeats})")
    dev = pick_device(device)
    model, tokenizer, _ = load_speech_model(checkpoint, dev, avg=avg)
    cuts = eval_cuts(manifest)
    if max_utts:
        cuts = cuts.subset(first=max_utts)
    warm = cuts.subset(first=min(warmup_utts, len(cuts)))
    methods = [DecodeSettings("greedy")] + [DecodeSettings("mtp-threshold", t) for t in thresholds] + [
        DecodeSettings("mtp-verify")] + [DecodeSettings("mtp-verify", draft_tree=w) for w in draft_trees]
    if model.encoder.ctc_head is not None:
        ctc_beam = {"ctc_beam_size": ctc_beam_size} if ctc_beam_size else {}  # else DecodeSettings' default
        methods += [DecodeSettings("ctc-verify", max_draft=d, draft_branches=b, draft_tree=w, **ctc_beam)
                    for d in max_drafts for b in draft_branches for w in [""] + list(draft_trees)]
        methods += [DecodeSettings("ctc-rescore", **ctc_beam)]
    if beam_size:
        methods += [DecodeSettings("beam", beam_size=beam_size)] + [
            DecodeSettings("mtp-beam", t, beam_size=beam_size) for t in thresholds] + [
            DecodeSettings("mtp-beam-verify", beam_size=beam_size)]
        joint_ctc = ctc_weight if ctc_weight and model.encoder.ctc_head is not None else 0.0
        if joint_ctc:
            methods += [DecodeSettings(m, beam_size=beam_size, ctc_weight=joint_ctc) for m in JOINT_METHODS]
        if word_lm:
            methods += [DecodeSettings(m, beam_size=beam_size, ctc_weight=joint_ctc, lexicon=str(lexicon or ""),
                                       word_lm=str(word_lm), lm_weight=lm_weight) for m in JOINT_METHODS]
    methods = [replace(s, decoder_threads=decoder_threads, lexicon=str(lexicon or "")) for s in methods]
    warm_up = [methods[0], replace(methods[0], method="mtp-verify")] + (methods[-1:] if beam_size else [])
    for settings in warm_up:  # allocator, kernels, caches (and the larger row counts of a beam)
        decode_cuts(model, tokenizer, warm, settings, max(batch_sizes), desc="warm-up")
    rows = []
    for bs in batch_sizes:
        runs = [[] for _ in methods]  # each method's DecodeResult per round
        for round_ in range(repeats):
            for settings, results in zip(methods, runs):
                desc = f"benchmark bs={bs}" + (f" round {round_ + 1}/{repeats}" if repeats > 1 else "")
                res = decode_cuts(model, tokenizer, cuts, settings, bs, desc=desc)
                check_decoded(res, manifest, len(cuts))
                results.append(res)
        base = None
        for settings, results in zip(methods, runs):
            res = results[0]
            s = res.summary()
            encoder_s = statistics.median(r.encoder_seconds for r in results)
            decoder_s = statistics.median(r.decoder_seconds for r in results)
            row = {"batch_size": bs, "method": settings.label(), "wer": round(compute_error_stats(res.results).wer, 3),
                   **{k: s[k] for k in ("num_utts", "num_tokens", "num_decoder_calls", "num_batch_calls",
                                        "tokens_per_call")},
                   "encoder_seconds": round(encoder_s, 4), "decoder_seconds": round(decoder_s, 4),
                   "decoder_seconds_per_round": [round(r.decoder_seconds, 4) for r in results],
                   "rtf": round((encoder_s + decoder_s) / max(res.audio_seconds, 1e-9), 5)}
            if base is None:
                base = row
                base_tokens = res.tokens
            row["speedup_calls"] = round(base["num_decoder_calls"] / max(row["num_decoder_calls"], 1), 3)
            row["speedup_seconds"] = round(base["decoder_seconds"] / max(row["decoder_seconds"], 1e-9), 3)
            row["same_as_greedy"] = round(sum(res.tokens[c] == base_tokens[c] for c in base_tokens)
                                          / max(len(base_tokens), 1), 4)
            rows.append(row)
    device_text = device_name(dev)
    if dev.type == "cpu" and decoder_threads:
        device_text += f", decoder loop on {decoder_threads} thread{'s' if decoder_threads > 1 else ''}"
    info = {"checkpoint": str(checkpoint), "avg": avg, "cuts": str(manifest), "device": device_text,
            "torch": torch.__version__, "num_threads": torch.get_num_threads(), "decoder_threads": decoder_threads,
            "repeats": repeats, "rows": rows}
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "benchmark.json", json.dumps(info, indent=2) + "\n")
    table = benchmark_table(rows)
    timing = f"; seconds: median of {repeats} rounds" if repeats > 1 else ""
    atomic_write_text(out_dir / "benchmark.md",
                      f"Device: {info['device']}, torch {torch.__version__}{timing}\n\n{table}\n")
    print(f"Device: {info['device']}{timing}\n{table}")
    return rows


def benchmark_table(rows: Sequence[dict]) -> str:
    head = ("| batch | method | WER % | decoder calls | tokens/call | decoder s | speed-up (calls) | "
            "speed-up (s) | RTF | same as greedy |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['batch_size']} | {r['method']} | {r['wer']:.2f} | {r['num_decoder_calls']} | "
                     f"{r['tokens_per_call']:.2f} | {r['decoder_seconds']:.2f} | {r['speedup_calls']:.2f}x | "
                     f"{r['speedup_seconds']:.2f}x | {r['rtf']:.4f} | {100 * r['same_as_greedy']:.1f}% |")
    return "\n".join(lines)


def transcribe_files(checkpoint: Path, avg: int, files: Sequence[Path], settings: DecodeSettings,
                     device: str = "auto") -> list:
    """One transcript per audio file (any format soundfile or ffmpeg reads, any rate, mono or stereo)."""
    from mtp_asr.data.audio import load_audio
    from mtp_asr.data.fbank import fbank_extractor
    from mtp_asr.data.dataset import pad_features

    dev = pick_device(device)
    model, tokenizer, _ = load_speech_model(checkpoint, dev, avg=avg)
    extractor = fbank_extractor()
    spelling = spelling_tokenizer(model, settings, tokenizer)
    out = []
    for f in files:
        samples = load_audio(f)
        feats = torch.from_numpy(extractor.extract(samples, 16000)).float()
        seconds = len(samples) / 16000
        if feats.shape[0] < MIN_FRAMES:
            raise ValueError(f"{f}: {seconds:.3f} s of audio is too short to transcribe (70 ms at least)")
        if model.max_new_tokens(feats.shape[0]) < 1:
            raise ValueError(f"{f}: {seconds:.1f} s of audio is too long for this model's decoder (max_seq_len "
                             f"{model.cfg.decoder.max_seq_len} positions); cut it into shorter pieces")
        x, lens = pad_features([feats])
        gen, _, _ = decode_batch(model, x, lens, [seconds], settings, tokenizer)
        out.append((str(f), spelling.decode(gen.hyps[0].tokens)))
    return out
