#!/usr/bin/env python3
"""Peak memory of long decodes: does `mtp-asr decode` stay flat as the number of utterances grows?

Builds a synthetic feature corpus (random 80-dim fbank-like frames, 1-4 s per utterance, in a Lilcom archive with a
real Lhotse manifest), a real sentencepiece tokenizer and a small random Speech-LLaMA checkpoint, then decodes the
first N utterances for each N, each in a fresh process so that every peak is its own, through the same library call
as `mtp-asr decode` (result files included). Prints peak RSS against N and the RSS growth per 100 utterances.

    python tools/bench_decode_memory.py                       # N = 100, 400, 1200, greedy
    python tools/bench_decode_memory.py --utts 200,2000 --method mtp-verify --json mem.json

Peak RSS comes from getrusage (the high-water mark of the process); it also moves with the allocator's
fragmentation and with the longest batch met, so it is reported, not judged alone. Two figures separate a leak from
that noise: the Python heap's peak during the decode (tracemalloc: what a decode keeps per utterance for scoring,
its reference, hypothesis and their alignment, a few kilobytes) and the tensors still alive after it (any tensor kept
per utterance shows up there).
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ["ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO", "FOXTROT", "GOLF", "HOTEL", "INDIA", "JULIET", "KILO", "LIMA",
         "MIKE", "NOVEMBER", "OSCAR", "PAPA", "QUEBEC", "ROMEO", "SIERRA", "TANGO"]
MODEL = {
    "encoder": {"dim": 64, "num_layers": 2, "num_heads": 4, "ffn_dim": 128, "conv_kernel": 7, "dropout": 0.0},
    "adapter": {"stack": 2},
    "decoder": {"dim": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 512},
    "heads": {"num_heads": 3, "kind": "latent"},
}


def peak_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux


def build_corpus(work: Path, num_utts: int, seed: int = 0) -> Path:
    """WORK/cuts_all.jsonl.gz: `num_utts` cuts with features in WORK/feats.lca."""
    import numpy as np
    from lhotse import CutSet, LilcomChunkyWriter, MonoCut, SupervisionSegment
    from lhotse.features.base import Features

    rng = np.random.default_rng(seed)
    cuts = []
    with LilcomChunkyWriter(str(work / "feats.lca")) as writer:
        for i in range(num_utts):
            frames = int(rng.integers(100, 400))
            feats = rng.normal(-7.0, 3.0, size=(frames, 80)).astype(np.float32)
            cut_id = f"utt{i:06d}"
            key = writer.write(cut_id, feats)
            duration = frames * 0.01
            features = Features(type="fbank", num_frames=frames, num_features=80, frame_shift=0.01,
                                sampling_rate=16000, start=0.0, duration=duration, storage_type=writer.name,
                                storage_path=writer.storage_path, storage_key=key)
            text = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))
            sup = SupervisionSegment(id=cut_id, recording_id=cut_id, start=0.0, duration=duration, text=text)
            cuts.append(MonoCut(id=cut_id, start=0.0, duration=duration, channel=0, supervisions=[sup],
                                features=features))
    path = work / "cuts_all.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(path)
    return path


def build_checkpoint(work: Path, manifest: Path) -> Path:
    """A random model with a real tokenizer, saved as `train` would save it (so `load_speech_model` reads it)."""
    import torch

    from mtp_asr.config import from_dict, to_dict
    from mtp_asr.data.tokenizer import manifest_texts, train_bpe, Tokenizer
    from mtp_asr.model.build import tokenizer_tensor
    from mtp_asr.model.speech_llama import ModelConfig, SpeechLlama
    from mtp_asr.train.checkpoint import save_checkpoint

    tokenizer = Tokenizer(train_bpe(manifest_texts([manifest]), work / "lang", vocab_size=len(WORDS) + 3,
                                    model_type="word"))
    cfg = json.loads(json.dumps(MODEL))
    cfg["decoder"]["vocab_size"] = tokenizer.vocab_size
    cfg["bos_id"], cfg["eos_id"] = tokenizer.bos_id, tokenizer.eos_id
    torch.manual_seed(0)
    model = SpeechLlama(from_dict(ModelConfig, cfg, "model"))
    path = work / "model.pt"
    save_checkpoint(path, {"kind": "speech_llama", "model_config": to_dict(model.cfg),
                           "tokenizer": tokenizer_tensor(tokenizer), "model": model.state_dict()})
    return path


def live_tensors() -> int:
    import gc
    import warnings

    import torch

    gc.collect()
    with warnings.catch_warnings():  # isinstance() touches deprecated module attributes (torch.distributed.reduce_op)
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def decode_one(args) -> None:
    """The child: decode the first N cuts, then print one JSON line with the figures."""
    import tracemalloc

    import torch

    from mtp_asr.decode.run import run_decode
    from mtp_asr.utils import setup_logging

    setup_logging()
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    manifest = work / f"cuts_first{args.child}.jsonl.gz"
    after_imports = peak_rss_kb()
    tensors_before = live_tensors()
    tracemalloc.start()
    start = time.perf_counter()
    (summary,) = run_decode(work / "model.pt", 1, "random", [manifest], args.method, [], None, args.batch_size,
                            work / f"decode-{args.child}", "cpu")
    seconds = time.perf_counter() - start
    python_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({"utts": args.child, "decoded": summary["num_utts"], "skipped": summary["num_skipped"],
                      "peak_rss_kb": peak_rss_kb(), "rss_after_imports_kb": after_imports,
                      "python_peak_kb": python_peak // 1024, "tensors_left": live_tensors() - tensors_before,
                      "seconds": round(seconds, 2)}))


def run_child(args, n: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(n), "--work-dir", str(args.work_dir), "--method", args.method,
           "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # its log lines go straight to our stderr
    if proc.returncode != 0:
        sys.exit(f"decoding {n} utterances failed (exit code {proc.returncode}); see its log above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def slope_mb_per_100(rows) -> float:
    """Least-squares slope of peak RSS against utterances, in MB per 100 utterances."""
    xs = [r["utts"] for r in rows]
    ys = [r["peak_rss_kb"] / 1024 for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 100 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def table(rows) -> str:
    lines = ["| utts | peak RSS (MB) | growth vs first (MB) | growth per 100 utts (MB) | Python heap peak (MB) "
             "| tensors left | decode s |", "|---|---|---|---|---|---|---|"]
    first = rows[0]
    for r in rows:
        growth = (r["peak_rss_kb"] - first["peak_rss_kb"]) / 1024
        per100 = f"{100 * growth / (r['utts'] - first['utts']):.3f}" if r is not first else "-"
        lines.append(f"| {r['utts']} | {r['peak_rss_kb'] / 1024:.1f} | {growth:.1f} | {per100} "
                     f"| {r['python_peak_kb'] / 1024:.2f} | {r['tensors_left']} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utts", default="100,400,1200", help="Comma-separated numbers of utterances to decode.")
    parser.add_argument("--method", default="greedy", help="Decoding method (as `mtp-asr decode --method`).")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in each decoding process.")
    parser.add_argument("--work-dir", help="Where the corpus, model and results go (default: a temporary dir).")
    parser.add_argument("--json", help="Also write the figures to this JSON file.")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        decode_one(args)
        return
    try:
        counts = sorted({int(n) for n in args.utts.split(",") if n})
    except ValueError:
        parser.error(f"--utts: {args.utts!r} is not a comma-separated list of integers")
    if not counts or counts[0] < 1 or args.batch_size < 1 or args.threads < 1:
        parser.error("--utts, --batch-size and --threads must be >= 1")
    with tempfile.TemporaryDirectory(prefix="bench-decode-memory-") as tmp:
        args.work_dir = Path(args.work_dir or tmp)
        args.work_dir.mkdir(parents=True, exist_ok=True)
        run(args, counts)


def run(args, counts) -> None:
    from lhotse import load_manifest

    from mtp_asr.utils import atomic_write_text, logger, setup_logging

    setup_logging()
    work = args.work_dir
    logger.info("building %d synthetic utterances and a random model in %s", counts[-1], work)
    everything = load_manifest(build_corpus(work, counts[-1]))
    for n in counts:
        everything.subset(first=n).to_file(work / f"cuts_first{n}.jsonl.gz")
    build_checkpoint(work, work / "cuts_all.jsonl.gz")
    rows = []
    for i, n in enumerate(counts, start=1):
        rows.append(run_child(args, n))
        logger.info("%d/%d: %d utterances, peak RSS %.1f MB", i, len(counts), n, rows[-1]["peak_rss_kb"] / 1024)
    slope = slope_mb_per_100(rows) if len(rows) > 1 else 0.0
    print(f"Decoding ({args.method}, batch {args.batch_size}, {args.threads} thread(s)): peak RSS per process\n")
    print(table(rows))
    print(f"\nRSS growth per 100 utts (least-squares slope): {slope:.3f} MB")
    if args.json:
        atomic_write_text(args.json, json.dumps({"method": args.method, "batch_size": args.batch_size,
                                                 "threads": args.threads, "rows": rows,
                                                 "growth_mb_per_100_utts": round(slope, 4)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
