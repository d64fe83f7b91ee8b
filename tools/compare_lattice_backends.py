#!/usr/bin/env python3
"""k2 versus the built-in lattice backend on the lattices of a real model.

Two steps, because k2 lives in its own environment (tools/venv-k2: Python 3.9, torch 1.13.1, k2 1.23.4):

    # 1. main environment: run mtp-beam over some cuts and save what it explored
    tools/venv/bin/python tools/compare_lattice_backends.py dump --checkpoint MODEL.pt \\
        --cuts data/fbank/cuts_test.jsonl.gz --out exp/lattices.jsonl.gz
    # 2. k2 environment (needs only mtp_asr.decode.lattice*, k2 and torch): compare the backends on them
    tools/venv-k2/bin/python tools/compare_lattice_backends.py compare exp/lattices.jsonl.gz

`compare` prints, for N-best extraction and for the expected word errors that MWER minimises (k2.MWERLoss versus
the built-in expectation over the same lattice's complete paths), whether the two backends agree and how long each
took. Token pieces are stored beside the lattices, so step 2 needs no sentencepiece.
"""
import argparse
import gzip
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def dump(args) -> None:
    import torch
    from lhotse import load_manifest

    from mtp_asr.data.dataset import AsrDataset
    from mtp_asr.decode.beam import beam_search
    from mtp_asr.decode.lattice import save_lattices
    from mtp_asr.decode.runner import batches_by_size
    from mtp_asr.model.build import load_speech_model
    from mtp_asr.utils import Progress, atomic_write_text, setup_logging

    setup_logging()
    torch.set_num_threads(args.num_threads)
    model, tokenizer, _ = load_speech_model(args.checkpoint)
    cuts = load_manifest(args.cuts)
    cuts = cuts.subset(first=min(args.max_utts, len(cuts))) if args.max_utts else cuts
    dataset = AsrDataset(None)
    lattices, refs = {}, {}
    bar = Progress("mtp-beam lattices", total=len(cuts), unit="utts")
    for batch in batches_by_size(cuts, args.batch_size):
        b = dataset[batch]
        with torch.no_grad():
            enc = model.encode(b["feats"], b["feat_lens"])
            prefix, prefix_lens = model.prompt(enc.audio, enc.audio_lens)
            limits = torch.tensor([model.max_new_tokens(int(n)) for n in b["feat_lens"]])
            out = beam_search(model.lm, prefix, prefix_lens, "mtp-beam", None, args.threshold, limits,
                              args.beam_size, args.beam_size, lattice=True)
        for cut_id, text, lat in zip(b["cut_ids"], b["texts"], out.lattices):
            lattices[cut_id], refs[cut_id] = lat, text
        bar.update(len(batch))
    bar.close()
    save_lattices(args.out, lattices)
    pieces = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.sp.get_piece_size())]
    atomic_write_text(sidecar(args.out), json.dumps({"pieces": pieces, "refs": refs}) + "\n")
    print(f"{len(lattices)} lattices -> {args.out} (+ {sidecar(args.out).name})")


def sidecar(path) -> Path:
    return Path(str(path) + ".refs.json")


def compare(args) -> None:
    from mtp_asr.decode.lattice import BuiltinBackend, load_lattices, mwer_from_paths
    from mtp_asr.decode.lattice_k2 import K2Backend, expected_word_errors

    lattices = load_lattices(args.lattices)
    side = json.loads(sidecar(args.lattices).read_text())
    pieces, ids = side["pieces"], list(lattices)
    lats = [lattices[i].trimmed() for i in ids]
    refs = [side["refs"][i].split() for i in ids]

    def to_words(tokens):
        return "".join(pieces[t] for t in tokens if 0 <= t < len(pieces)).replace("\u2581", " ").split()

    builtin, k2b = BuiltinBackend(), K2Backend()
    rows = {"lattices": len(lats), "arcs": sum(len(lat.arcs) for lat in lats),
            "complete_paths": sum(lat.num_paths for lat in lats)}
    timings = {}
    results = {}
    for name, backend in (("builtin", builtin), ("k2", k2b)):
        t = time.perf_counter()
        results[name] = backend.nbest(lats, args.nbest)
        timings[f"nbest_{name}_s"] = round(time.perf_counter() - t, 4)
    same_tokens = all([p.tokens for p in a] == [p.tokens for p in b]
                      for a, b in zip(results["builtin"], results["k2"]))
    score_diff = max((abs(p.score - q.score) for a, b in zip(results["builtin"], results["k2"])
                      for p, q in zip(a, b)), default=0.0)

    # Expected word errors: built-in over every complete path, k2.MWERLoss over sampled paths (enough samples to
    # meet every distinct word sequence of these small lattices).
    t = time.perf_counter()
    every = builtin.nbest(lats, max([lat.num_paths for lat in lats] + [1]))
    want = [mwer_from_paths(paths, ref, to_words, args.temperature).expected_errors if paths else 0.0
            for paths, ref in zip(every, refs)]
    timings["mwer_builtin_s"] = round(time.perf_counter() - t, 4)
    t = time.perf_counter()
    got = expected_word_errors(lats, refs, to_words, num_paths=args.num_paths, nbest_scale=1.0,
                               temperature=args.temperature)
    timings["mwer_k2_s"] = round(time.perf_counter() - t, 4)
    mwer_diff = max(abs(a - b) for a, b in zip(want, got)) if want else 0.0
    rows.update({"nbest": args.nbest, "nbest_identical_tokens": same_tokens, "nbest_max_score_diff": score_diff,
                 "expected_errors_builtin": round(sum(want), 4), "expected_errors_k2": round(sum(got), 4),
                 "expected_errors_max_diff": mwer_diff, **timings})
    print(json.dumps(rows, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump", help="main environment: mtp-beam lattices of a model on some cuts")
    d.add_argument("--checkpoint", required=True)
    d.add_argument("--cuts", required=True)
    d.add_argument("--out", required=True, help="lattices file (.jsonl.gz); references go beside it")
    d.add_argument("--max-utts", type=int, default=0)
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--beam-size", type=int, default=4)
    d.add_argument("--threshold", type=float, default=0.8)
    d.add_argument("--num-threads", type=int, default=2)
    c = sub.add_parser("compare", help="k2 environment: both backends on the dumped lattices")
    c.add_argument("lattices")
    c.add_argument("--nbest", type=int, default=4)
    c.add_argument("--num-paths", type=int, default=500, help="paths k2.MWERLoss samples per lattice")
    c.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    dump(args) if args.command == "dump" else compare(args)


if __name__ == "__main__":
    main()
