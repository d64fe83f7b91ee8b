"""The bad-input catalogue cases not covered by the other test files: each names the culprit (file, cut or option)
and ends in a counted skip or a clean stop, with nothing half-written. The rest of the catalogue lives in
test_prepare.py (audio and transcript faults at preparation), test_train.py (configs, checkpoints, non-finite
losses, signals) and test_recipes.py (paths with spaces, reruns); the SIGKILL test is test_kill.py.
"""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner
from lhotse import CutSet, load_manifest

from mtp_asr.cli import main
from mtp_asr.data.dataset import AsrDataset, read_cuts
from mtp_asr.data.fbank import compute_fbank
from mtp_asr.data.prepare import prepare_kaldi
from mtp_asr.data.tokenizer import Tokenizer
from mtp_asr.model.build import load_speech_model
from mtp_asr.train.checkpoint import (
    CheckpointError, latest_checkpoint, load_checkpoint, remove_stale_temp_files,
)
from mtp_asr.train.run import train_speech
from mtp_asr.train.trainer import TrainingError

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import make_corpus, random_sentences, tiny_train_config, write_feature_cuts  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    """A tiny model trained for one epoch (decoder max_seq_len 256)."""
    exp = tmp_path_factory.mktemp("trained")
    assert train_speech(tiny_train_config(corpus, num_epochs=1), exp) == 0
    return exp / "epoch-1.pt"


def feature_cuts(path: Path, sentences, seed: int = 5, drop_features: bool = False) -> Path:
    """A manifest of feature cuts (ids `<name>-NNNN`); drop_features deletes their archive, as a lost disk would."""
    write_feature_cuts(path, sentences, seed)
    if drop_features:
        os.unlink(path.parent / f"{path.name.split('.')[0]}-feats.lca")
    return path


def combined(path: Path, *manifests) -> Path:
    CutSet.from_cuts(c for m in manifests for c in load_manifest(m)).to_file(path)
    return path


def train_log(exp: Path) -> str:
    return (exp / "log" / "log-train-rank0.txt").read_text()


def decode(checkpoint: Path, manifest: Path, out_dir: Path, *extra):
    return CliRunner().invoke(main, ["decode", "--checkpoint", str(checkpoint), "--cuts", str(manifest),
                                     "--out-dir", str(out_dir), "--device", "cpu", *map(str, extra)])


def summary(out_dir: Path, manifest: Path) -> dict:
    (path,) = out_dir.glob(f"summary-{manifest.name.split('.')[0].removeprefix('cuts_')}-*.json")
    return json.loads(path.read_text())


# ---- silence and text outside the tokenizer: prepare -> fbank -> train -> decode --------------------------------
def test_silence_and_text_outside_the_tokenizer_end_to_end(corpus, kaldi_writer, tmp_path):
    texts = ["red cat", "the dog runs", "a big cat", "blue dog"]
    utts = {f"tone{i}": (0.6 + 0.1 * i, text) for i, text in enumerate(texts)}
    utts.update({"quiet": (0.75, "the cat sits"), "alien": (0.6, "the purple cat")})  # PURPLE: not in the tokenizer
    data = kaldi_writer(tmp_path / "data" / "odd", utts)
    sf.write(data / "audio" / "quiet.wav", np.zeros(12000, np.float32), 16000, subtype="PCM_16")

    prepared = prepare_kaldi(data, tmp_path / "manifests")
    assert "kept 6 utterances" in (tmp_path / "manifests" / "prepare-report-odd.txt").read_text()
    feats = compute_fbank(prepared.parent, tmp_path / "fbank", jobs=1)["odd"]
    quiet = load_manifest(feats)["quiet"].load_features()
    assert np.isfinite(quiet).all() and np.ptp(quiet) == 0  # digital silence sits on fbank's log floor

    exp = tmp_path / "exp"
    cfg = tiny_train_config(corpus, num_epochs=1, **{"data.train_cuts": [str(feats)], "data.valid_cuts": [str(feats)]})
    assert train_speech(cfg, exp) == 0
    log = train_log(exp)
    assert "skipping cut alien: its transcript holds text outside the tokenizer's vocabulary (▁PURPLE)" in log
    assert "epoch 1: 1 cuts skipped" in log
    assert "quiet" not in log and not list(exp.glob("bad-batch-*"))  # silence trains with a finite loss

    result = decode(exp / "epoch-1.pt", feats, tmp_path / "dec")
    assert result.exit_code == 0, result.output
    s = summary(tmp_path / "dec", feats)
    assert (s["num_utts"], s["num_skipped"]) == (6, 0)  # decoding needs no tokens: both are scored
    recogs = next((tmp_path / "dec").glob("recogs-*")).read_text()
    assert "alien:\tref=['THE', 'PURPLE', 'CAT']" in recogs and "quiet:\thyp=" in recogs


# ---- feature files that a manifest references but that are gone ---------------------------------------------------
def test_missing_feature_files_at_training(corpus, tmp_path):
    gone = feature_cuts(tmp_path / "gone.jsonl.gz", random_sentences(3, 5), drop_features=True)
    exp = tmp_path / "exp"
    cfg = tiny_train_config(corpus, num_epochs=1, **{"data.train_cuts": [str(corpus["train"]), str(gone)]})
    assert train_speech(cfg, exp) == 0
    log = train_log(exp)
    for i in range(3):
        assert f"skipping cut gone-{i:04d}: cannot load its features (FileNotFoundError: " in log
    assert "gone-feats.lca" in log and "[extra info]" not in log  # one line, not Lhotse's dump of the cut
    assert "epoch 1: 3 cuts skipped" in log

    only_gone = tmp_path / "exp-gone"
    cfg = tiny_train_config(corpus, num_epochs=1, **{"data.train_cuts": [str(gone)]})
    with pytest.raises(TrainingError, match=r"epoch 1: all \d+ batches were empty, every cut was skipped \(3;"):
        train_speech(cfg, only_gone)
    assert not list(only_gone.glob("*.pt")) and not list(only_gone.glob(".*"))


def test_missing_feature_files_at_decoding(trained, corpus, tmp_path):
    gone = feature_cuts(tmp_path / "gone.jsonl.gz", random_sentences(3, 5), drop_features=True)
    mixed = combined(tmp_path / "cuts_mixed.jsonl.gz", corpus["valid"], gone)
    result = decode(trained, mixed, tmp_path / "dec")
    assert result.exit_code == 0, result.output
    assert (summary(tmp_path / "dec", mixed)["num_utts"], summary(tmp_path / "dec", mixed)["num_skipped"]) == (6, 3)

    result = decode(trained, gone, tmp_path / "dec2")
    assert result.exit_code == 1
    assert f"nothing of {gone} was decoded: 3 of its 3 cuts were skipped" in result.output
    assert not (tmp_path / "dec2").exists()  # no result files claiming a WER over nothing


# ---- audio longer than the model's limit -----------------------------------------------------------------------------
def test_audio_too_long_for_the_decoder_at_decode_time(trained, corpus, tmp_path):
    long = feature_cuts(tmp_path / "long.jsonl.gz", ["RED " * 200], seed=9)  # 24 s: a prompt of 302 > 256 positions
    mixed = combined(tmp_path / "cuts_withlong.jsonl.gz", corpus["valid"], long)
    result = decode(trained, mixed, tmp_path / "dec")
    assert result.exit_code == 0, result.output
    s = summary(tmp_path / "dec", mixed)
    assert (s["num_utts"], s["num_skipped"]) == (6, 1)
    assert "long-0000" not in next((tmp_path / "dec").glob("recogs-*")).read_text()


def test_dataset_skips_cuts_that_do_not_fit_the_model(trained, tmp_path):
    model, tokenizer, _ = load_speech_model(trained)
    limit = model.cfg.decoder.max_seq_len
    fits = lambda frames, tokens: model.prompt_length(frames) + tokens <= limit  # noqa: E731
    long = feature_cuts(tmp_path / "long.jsonl.gz", ["RED " * 200, "THE CAT"], seed=9)
    batch = AsrDataset(tokenizer, fits=fits)[load_manifest(long)]
    assert batch["cut_ids"] == ["long-0001"] and batch["num_skipped"] == 1
    assert batch["tokens"] == [tokenizer.encode("THE CAT")]


def test_audio_too_long_for_the_decoder_at_training_time(corpus, tmp_path):
    long = feature_cuts(tmp_path / "long.jsonl.gz", ["RED " * 20], seed=9)  # 2.5 s: a prompt of 33 > 32 positions
    exp = tmp_path / "exp"
    cfg = tiny_train_config(corpus, num_epochs=1, **{"data.train_cuts": [str(corpus["train"]), str(long)],
                                                     "model.decoder.max_seq_len": 32})
    assert train_speech(cfg, exp) == 0
    assert "skipping cut long-0000: 2.5 s of audio and 20 tokens do not fit" in train_log(exp)


def test_sets_to_decode_are_checked_before_decoding(trained, corpus, tmp_path):
    """Each refused before any decoding, naming the manifest: no cuts, a cut id twice (its results would be one), two
    manifests of one set name (their result files would overwrite each other)."""
    empty = tmp_path / "cuts_empty.jsonl.gz"
    gzip.open(empty, "wt").close()
    twice = tmp_path / "cuts_twice.jsonl.gz"
    CutSet.from_cuts(list(load_manifest(corpus["valid"])) * 2).to_file(twice)
    (tmp_path / "other").mkdir()
    same_name = combined(tmp_path / "other" / corpus["valid"].name, corpus["valid"])
    bench = ["benchmark", "--checkpoint", str(trained), "--cuts", str(empty), "--out-dir", str(tmp_path / "b")]
    for args, message in [
            (bench, f"cut manifest {empty} holds no cuts"),
            (["decode", "--checkpoint", str(trained), "--cuts", str(twice)], f"cut manifest {twice}: cut id "),
            (["decode", "--checkpoint", str(trained), "--cuts", str(corpus["valid"]), "--cuts", str(same_name)],
             "are both the set 'valid'"),
            (["decode", "--checkpoint", str(trained), "--avg", "2", "--cuts", str(corpus["valid"])],
             "--checkpoint names one model file")]:
        result = CliRunner().invoke(main, [*args, "--device", "cpu"] + (["--out-dir", str(tmp_path / "d")]
                                                                          if args[0] == "decode" else []))
        assert result.exit_code == 1 and message in result.output, result.output
    assert not (tmp_path / "b").exists() and not (tmp_path / "d").exists()


def test_transcribe_names_audio_too_short_or_too_long(trained, audio_writer, tmp_path):
    for seconds, message in [(0.03, "s of audio is too short to transcribe"),
                             (25.0, "s of audio is too long for this model's decoder (max_seq_len 256")]:
        audio = tmp_path / f"{seconds}s.wav"
        audio_writer(audio, seconds)
        result = CliRunner().invoke(main, ["transcribe", "--checkpoint", str(trained), "--device", "cpu", str(audio)])
        assert result.exit_code == 1 and f"{audio}: " in result.output and message in result.output, result.output


def test_unknown_or_missing_device_is_named(trained, corpus, tmp_path):
    result = decode(trained, corpus["valid"], tmp_path / "out", "--device", "gpu")
    assert result.exit_code == 1 and "--device must be auto, cpu, cuda or cuda:N (got 'gpu')" in result.output
    if not torch.cuda.is_available():
        result = decode(trained, corpus["valid"], tmp_path / "out", "--device", "cuda")
        assert result.exit_code == 1 and "--device cuda: no GPU is available" in result.output
    assert not list(tmp_path.rglob("recogs-*"))
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        train_speech(tiny_train_config(corpus, device="tpu"), tmp_path / "exp")


# ---- invalid option values on the command line ---------------------------------------------------------------------
USAGE_ERRORS = {
    "K < 1": (["decode", "--method", "mtp-verify", "-K", "0"], "'--num-heads' / '-K': 0 is not in the range x>=1"),
    "tau < 0": (["decode", "--method", "mtp-threshold", "--threshold", "-0.5"], "-0.5 is not in the range x>=0"),
    "beam size 0": (["decode", "--method", "beam", "--beam-size", "0"], "'--beam-size': 0 is not in the range x>=1"),
    "batch size 0": (["decode", "--batch-size", "0"], "'--batch-size': 0 is not in the range x>=1"),
    "nbest 0": (["decode", "--method", "beam", "--nbest", "0"], "'--nbest': 0 is not in the range x>=1"),
    "beam option without a beam method": (["decode", "--beam-size", "4"],
                                          "applies to beam, mtp-beam and mtp-beam-verify only"),
    "draft tree not integers": (["decode", "--method", "mtp-verify", "--draft-tree", "3,x"],
                                "--draft-tree must be widths per head 2..K"),
    "draft tree width 0": (["decode", "--method", "ctc-verify", "--draft-tree", "2,0,1"], "widths must be >= 1"),
    "draft tree without verification": (["decode", "--draft-tree", "2,2,2"],
                                        "applies to mtp-verify and ctc-verify only"),
    "draft branches without ctc-verify": (["decode", "--method", "mtp-verify", "--draft-branches", "2"],
                                          "applies to ctc-verify only, not --method mtp-verify"),
    "draft branches 0": (["transcribe", "--method", "ctc-verify", "--draft-branches", "0"],
                         "'--draft-branches': 0 is not in the range x>=1"),
    "transcribe K < 1": (["transcribe", "-K", "0"], "0 is not in the range x>=1"),
    "K without heads 2..K": (["decode", "-K", "2"], "applies to mtp-threshold, mtp-verify, ctc-verify, mtp-beam and "
                                                    "mtp-beam-verify only, not --method greedy"),
    "transcribe K with beam": (["transcribe", "--method", "beam", "-K", "2"], "not --method beam"),
    "benchmark negative max-utts": (["benchmark", "--max-utts", "-1"], "'--max-utts': -1 is not in the range x>=0"),
    "benchmark batch sizes": (["benchmark", "--batch-sizes", "4,0"], "batch sizes must be >= 1"),
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_invalid_decode_options_are_refused(case, trained, corpus, tmp_path):
    args, message = USAGE_ERRORS[case]
    command, *options = args
    where = {"decode": ["--cuts", str(corpus["valid"]), "--out-dir", str(tmp_path / "out")],
             "benchmark": ["--cuts", str(corpus["valid"]), "--out-dir", str(tmp_path / "out")],
             "transcribe": []}[command]
    tail = [str(REPO / "tests" / "conftest.py")] if command == "transcribe" else []  # any existing file: never read
    result = CliRunner().invoke(main, [command, "--checkpoint", str(trained), *where, *options, *tail])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


DATA_ERRORS = {
    "negative hours": (["prepare", "synth", "{tmp}/synth", "--hours", "-1"], "'--hours': -1.0 is not in the range x>0"),
    "zero hours": (["prepare", "synth", "{tmp}/synth", "--hours", "0"], "0.0 is not in the range x>0"),
    "zero jobs": (["compute-fbank", "{tmp}", "{tmp}/fbank", "-j", "0"], "'--jobs' / '-j': 0 is not in the range x>=1"),
    "vocab size 0": (["train-bpe", "{train}", "{tmp}/bpe", "--vocab-size", "0"], "0 is not in the range x>=4"),
}


@pytest.mark.parametrize("case", sorted(DATA_ERRORS))
def test_invalid_data_options_are_refused(case, corpus, tmp_path):
    args, message = DATA_ERRORS[case]
    args = [a.format(tmp=tmp_path, train=corpus["train"]) for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing made


CONFIG_ERRORS = {
    "K < 1": ("model.heads.num_heads=0", "train config.model.heads: heads.num_heads must be >= 1 (got 0)"),
    "negative max duration": ("data.max_duration=-5", "data.max_duration and data.max_utt_duration must be > 0"),
    "negative utterance limit": ("data.max_utt_duration=-1", "data.max_utt_duration must be > 0"),
    "negative learning rate": ("optim.lr=-0.001", "optim.lr must be > 0"),
    "negative ctc weight": ("ctc_weight=-1", "ctc_weight must be >= 0"),
    "unknown key": ("optim.learning_rate=1", "train config.optim: unknown key(s) learning_rate"),
    "no time masks": ("spec_augment.frames_per_time_mask=0", "spec_augment.frames_per_time_mask must be >= 1 (got 0)"),
    "odd subsampling": ("model.encoder.subsampling=3", "encoder.subsampling must be 2 or 4 (got 3)"),
    "negative audio position rate": ("model.audio_position_rate=-1", "audio_position_rate must be >= 0 (got -1.0)"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_invalid_config_values_stop_cleanly(case, corpus, tmp_path):
    override, message = CONFIG_ERRORS[case]
    cfg_path = tmp_path / "train.yaml"
    cfg_path.write_text(json.dumps(tiny_train_config(corpus)))  # JSON is YAML
    exp = tmp_path / "exp"
    result = CliRunner().invoke(main, ["train", "-c", str(cfg_path), "--exp-dir", str(exp), "--set", override])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not list(exp.glob("*.pt")) and not (exp / "config.yaml").exists()


# ---- manifests that are not manifests --------------------------------------------------------------------------------
def _not_json(path: Path) -> None:
    with gzip.open(path, "wt") as f:
        f.write("utt1 /data/utt1.wav\n")


def _truncated_gzip(path: Path, source: Path) -> None:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_second_line(path: Path, source: Path) -> None:
    lines = gzip.decompress(source.read_bytes()).decode().splitlines()
    path.write_bytes(gzip.compress(("\n".join([lines[0], lines[1][:40]] + lines[2:]) + "\n").encode()))


def _recordings_not_cuts(path: Path) -> None:
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"id": "r1", "sources": [], "sampling_rate": 16000, "num_samples": 16000,
                            "duration": 1.0}) + "\n")


@pytest.mark.parametrize("spoil, line", [(_not_json, 1), (_truncated_gzip, None), (_bad_second_line, 2),
                                         (_recordings_not_cuts, 1)])
def test_a_manifest_that_is_not_a_cut_manifest_is_named(spoil, line, trained, corpus, tmp_path):
    bad = tmp_path / "cuts_bad.jsonl.gz"
    spoil(bad, corpus["valid"]) if spoil in (_truncated_gzip, _bad_second_line) else spoil(bad)
    where = f"{bad}:{line}: " if line else f"{bad}:"
    for lazy in (False, True):
        with pytest.raises(ValueError, match="not a Lhotse cut manifest") as e:
            read_cuts(bad, lazy=lazy)
        assert str(e.value).startswith(where)
    result = decode(trained, bad, tmp_path / "dec")
    assert result.exit_code == 1 and f"Error: {where}" in result.output, result.output
    assert not (tmp_path / "dec").exists()


def test_cut_manifests_must_be_json_lines(tmp_path):
    (tmp_path / "cuts.yaml").write_text("a: 1\n")
    with pytest.raises(ValueError, match=r"cuts.yaml: expected JSON lines \(.jsonl or .jsonl.gz\)"):
        read_cuts(tmp_path / "cuts.yaml")
    with pytest.raises(FileNotFoundError, match="cut manifest .*absent.jsonl.gz does not exist"):
        read_cuts(tmp_path / "absent.jsonl.gz")


def test_a_training_manifest_that_is_not_json_is_named(corpus, tmp_path):
    bad = tmp_path / "cuts_bad.jsonl.gz"
    _not_json(bad)
    with pytest.raises(ValueError, match=f"{bad}:1: not a Lhotse cut manifest"):
        train_speech(tiny_train_config(corpus, **{"data.train_cuts": [str(bad)]}), tmp_path / "exp")


# ---- truncated checkpoints and leftovers of killed writes ------------------------------------------------------------
def test_truncated_checkpoint(trained, corpus, tmp_path):
    data = trained.read_bytes()
    truncated = tmp_path / "epoch-9.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"checkpoint {truncated} is unreadable or truncated"):
        load_checkpoint(truncated)
    result = decode(truncated, corpus["valid"], tmp_path / "dec")
    assert result.exit_code == 1 and f"checkpoint {truncated} is unreadable or truncated" in result.output
    assert not (tmp_path / "dec").exists()

    # Resume skips a damaged newest file (it warns) and takes the newest readable one.
    (tmp_path / "epoch-1.pt").write_bytes(data)
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch-1.pt"


def test_temp_files_of_interrupted_writes_are_removed(tmp_path):
    left = [tmp_path / ".checkpoint-4.pt.k2j_x9ab.tmp.pt", tmp_path / ".config.yaml.abcdefgh.tmp.yaml"]
    kept = [tmp_path / ".notes.tmp", tmp_path / "checkpoint-2.pt", tmp_path / ".hidden.abcdefgh.tmpfile"]
    for p in left + kept:
        p.write_bytes(b"x")
    remove_stale_temp_files(tmp_path)
    assert sorted(tmp_path.iterdir()) == sorted(kept)


# ---- memory on long decodes ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_decode_memory_stays_flat(tmp_path):
    """tools/bench_decode_memory.py at a small scale: 4x the utterances keep no tensors and a few KB per utterance."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_decode_memory.py"), "--utts", "100,400",
                           "--work-dir", str(tmp_path), "--json", str(tmp_path / "mem.json")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "mem.json").read_text())["rows"]
    assert [r["utts"] for r in rows] == [100, 400] and all(r["decoded"] == r["utts"] for r in rows)
    # What the decode keeps per utterance is a few kilobytes of Python objects (hypothesis, reference and, while
    # scoring, their alignment; the random model's hypotheses run to ~45 words), and no tensor outlives it; peak RSS
    # also moves with allocator fragmentation, so it only has to stay far from proportional to the utterances.
    per_utt_kb = (rows[1]["python_peak_kb"] - rows[0]["python_peak_kb"]) / 300
    assert per_utt_kb < 16, rows
    assert all(r["tensors_left"] <= 0 for r in rows), rows
    assert rows[1]["peak_rss_kb"] < 1.25 * rows[0]["peak_rss_kb"], rows
    assert "peak RSS" in proc.stdout and "per 100 utts" in proc.stdout
