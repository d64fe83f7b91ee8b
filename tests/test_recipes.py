"""The recipes end to end, as a user runs them: the quick demo (under a path with a space, rerun and resume after a
failed stage) and the LibriSpeech recipe on a tiny LibriSpeech-layout corpus spoken by espeak-ng."""
import ast
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from mtp_asr.decode.tree_spec import parse_tree
from mtp_asr.ngram import NgramLM, train_kneser_ney
from mtp_asr.train.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(os.environ.get("MTP_ASR_VENV", REPO / "tools" / "venv")) / "bin"


def recipe_copy(name: str, root: Path) -> Path:
    """egs/<name>/asr copied under `root`, with tools/ and local/ linked to the repository's (as in the repo)."""
    src = REPO / "egs" / name / "asr"
    dst = root / "egs" / name / "asr"
    dst.mkdir(parents=True)
    shutil.copy2(src / "run.sh", dst / "run.sh")
    shutil.copytree(src / "conf", dst / "conf")
    (dst / "tools").symlink_to(REPO / "tools")
    (dst / "local").symlink_to(REPO / "local")
    return dst


def run(recipe: Path, *args, check=True, timeout=1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", str(recipe / "run.sh"), *map(str, args)], cwd=recipe, capture_output=True,
                          text=True, timeout=timeout, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def summary_rows(recipe: Path) -> list:
    return json.loads((recipe / "exp" / "summary.json").read_text())


@pytest.mark.slow
def test_quick_demo_end_to_end_rerun_and_resume(tmp_path):
    recipe = recipe_copy("synth", tmp_path / "with space")
    first = run(recipe, "--quick", "true")
    rows = summary_rows(recipe)
    # the averaged model with self-distilled heads, and the MWER model after its 4 steps
    models = {"avg-epoch-3-avg-2-distilled", "checkpoint-4"}
    assert {r["checkpoint"] for r in rows} == models
    for test_set in ("test", "test_unseen_voice"):
        for model in models:
            these = [r for r in rows if r["test_set"] == test_set and r["checkpoint"] == model]
            methods = {r["method"] for r in these}
            want = {"greedy", "mtp-verify", "mtp-beam"} | (
                {"ctc", "mtp-threshold", "ctc-verify", "ctc-rescore", "beam", "mtp-beam-verify"}
                if model.startswith("avg") else set())
            assert methods == want, (model, methods)
            trees = {r["method"]: r["draft_tree"] for r in these if r["draft_tree"]}
            if model.startswith("avg"):  # the tree of 24 nodes fitted on dev (fewer if fewer rank paths occurred)
                assert sorted(trees) == ["ctc-verify", "mtp-verify"]  # each also with the tree
                assert {r["draft_branches"] for r in these if r["method"] == "ctc-verify"} == {1, 2}
                (tree,) = set(trees.values())
                assert tree == (recipe / "exp" / "asr" / "decode" / "draft-tree-24.txt").read_text().strip()
                assert 0 < len(parse_tree(tree)) <= 24 and max(map(len, parse_tree(tree))) <= 3
            else:
                assert trees == {}, (model, trees)
            # every decoder method with the lexicon of the training text; greedy also without it, and the CTC head
            # alone (the first model) without it (best path) and with it (a beam search over its words)
            words = str(Path("data") / "lang_char" / "words.txt")
            plain = [r["method"] for r in these if not r["lexicon"]]
            assert plain == (["ctc", "greedy"] if model.startswith("avg") else []) and all(
                r["lexicon"] == words for r in these if r["lexicon"])
            greedy = next(r for r in these if r["method"] == "greedy" and r["lexicon"])
            ctcs = [r for r in these if r["method"] == "ctc"]
            assert all(r["num_decoder_calls"] == 0 and r["speedup_calls"] is None for r in ctcs)
            assert sorted(r["ctc_beam_size"] for r in ctcs) == ([1, 16] if model.startswith("avg") else [])
            rescore = [r for r in these if r["method"] == "ctc-rescore"]
            assert all(r["num_decoder_calls"] == 2 * r["num_utts"] for r in rescore)
            # beam and mtp-beam-verify twice: the decoder alone, and joint decoding with the CTC head and the word
            # 3-gram of stage 3
            joint = sorted(((r["method"], r["ctc_weight"], r["lm_weight"], r["word_lm"]) for r in these
                            if r["method"] in ("beam", "mtp-beam-verify")), key=str)
            arpa = str(Path("data") / "lm" / "word-3gram.arpa.gz")
            assert joint == ([("beam", 0.5, 0.5, arpa), ("beam", None, None, None),
                              ("mtp-beam-verify", 0.5, 0.5, arpa), ("mtp-beam-verify", None, None, None)]
                             if model.startswith("avg") else [])
            for r in these:
                if r["method"] in ("mtp-verify", "ctc-verify"):
                    assert r["wer"] == greedy["wer"]  # lossless methods
                    assert r["num_decoder_calls"] < greedy["num_decoder_calls"]
    assert "| test | avg-epoch-3-avg-2-distilled | greedy |" in first.stdout
    assert "| test | avg-epoch-3-avg-2-distilled | ctc ctcB1 | - | - |" in first.stdout
    assert "| test | avg-epoch-3-avg-2-distilled | ctc ctcB16 lex | - | - |" in first.stdout
    assert "| test | avg-epoch-3-avg-2-distilled | greedy lex |" in first.stdout
    lexicon = (recipe / "data" / "lang_char" / "words.txt").read_text().split()
    assert lexicon == sorted(set(lexicon)) and len(lexicon) > 100
    assert NgramLM.read_arpa(recipe / "data" / "lm" / "word-3gram.arpa.gz").order == 3
    assert "stage 11: mwer" in first.stdout and "agree with greedy decoding" in first.stderr
    assert (recipe / "exp" / "mwer" / "tensorboard").is_dir()
    for name in ("recogs", "errs", "wer-summary", "summary"):
        assert list((recipe / "exp" / "asr" / "decode" / "greedy").glob(f"{name}-test-*")), name

    # A rerun skips every finished stage.
    again = run(recipe, "--quick", "true")
    assert again.stdout.count("already done") >= 12

    # A failed stage leaves no marker; the rerun resumes there and only there.
    (recipe / "exp" / ".done" / "average").unlink()
    failed = run(recipe, "--quick", "true", "--avg", "99", check=False)
    assert failed.returncode != 0 and not (recipe / "exp" / ".done" / "average").exists()
    resumed = run(recipe, "--quick", "true")
    assert "stage 7: average" in resumed.stdout and "stage 6 (asr): already done" in resumed.stdout


def write_librispeech(root: Path) -> Path:
    """A tiny LibriSpeech layout: <part>/<speaker>/<chapter>/<spk>-<ch>-<utt>.flac plus <spk>-<ch>.trans.txt."""
    sentences = ["THE CAT SAT ON THE MAT", "A DOG RAN IN THE PARK", "WE READ A GOOD BOOK", "THE SUN IS WARM TODAY",
                 "SHE HAS A RED CAR", "HE WENT TO THE SHOP", "THE BIRD CAN SING", "IT IS A BIG TREE"]
    parts = {"train-clean-100": (sentences * 2, ["en-us", "en-gb"]), "dev-clean": (sentences[:3], ["en-us"]),
             "test-clean": (sentences[3:6], ["en-gb"]), "test-other": (sentences[5:8], ["en-us"])}
    for p_i, (part, (texts, voices)) in enumerate(parts.items()):
        speaker, chapter = 100 + p_i, 200 + p_i
        d = root / "LibriSpeech" / part / str(speaker) / str(chapter)
        d.mkdir(parents=True)
        lines = []
        for i, text in enumerate(texts):
            utt = f"{speaker}-{chapter}-{i:04d}"
            wav = subprocess.run(["espeak-ng", "-v", voices[i % len(voices)], "--stdout", text.lower()],
                                 capture_output=True, check=True).stdout
            tmp = d / f"{utt}.tmp.wav"
            tmp.write_bytes(wav)
            audio, rate = sf.read(tmp, dtype="float32")
            tmp.unlink()
            idx = np.round(np.arange(0, len(audio), rate / 16000)).astype(int).clip(max=len(audio) - 1)
            sf.write(d / f"{utt}.flac", audio[idx], 16000)
            lines.append(f"{utt} {text}")
        (d / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return root / "LibriSpeech"


@pytest.mark.parametrize("spelling", [["--quick", "true"], ["--quick=true"]])
def test_quick_defaults_whichever_way_the_option_is_written(spelling, tmp_path):
    proc = run(recipe_copy("synth", tmp_path), *spelling, "--stage", 99)
    assert "settings: quick true, 0.03 h of audio (espeak,flite)" in proc.stdout
    assert "MWER 4 steps" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng speaks the tiny corpus")
def test_librispeech_recipe_on_a_tiny_corpus(tmp_path):
    corpus = write_librispeech(tmp_path / "corpus")
    recipe = recipe_copy("librispeech", tmp_path)
    lm = yaml.safe_load((recipe / "conf" / "lm_125m.yaml").read_text())
    lm["decoder"] = {"dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 512}
    lm["data"]["max_tokens"] = 1000
    lm["optim"] = {"lr": 3e-3, "warmup_steps": 2}
    lm["save_every_n"] = 0
    train = yaml.safe_load((recipe / "conf" / "train_125m.yaml").read_text())
    train["model"]["encoder"] = {"dim": 32, "num_layers": 1, "num_heads": 2, "ffn_dim": 64, "conv_kernel": 3,
                                 "subsampling_channels": 8, "ctc": True}
    train["data"].update({"max_duration": 20})
    train.update({"num_workers": 0, "save_every_n": 0, "optim": {"lr": 3e-3, "warmup_steps": 2}})
    (recipe / "conf" / "lm_tiny.yaml").write_text(yaml.safe_dump(lm))
    (recipe / "conf" / "train_tiny.yaml").write_text(yaml.safe_dump(train))

    # Data preparation alone first (a stop before the tokenizer is a success), then the rest resumes from it.
    first = run(recipe, "--corpus-dir", corpus, "--nj", 1, "--stop-stage", 2)
    assert "stage 2: fbank" in first.stdout and "stage 3" not in first.stdout
    # A Kaldi-style lexicon (word, then its spelling) of every word in the corpus' transcripts.
    words = sorted({w for f in corpus.rglob("*.trans.txt") for line in f.read_text().splitlines()
                    for w in line.split()[1:]})
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("".join(f"{w} {' '.join(w)}\n" for w in words))
    word_lm = tmp_path / "lm.arpa.gz"  # a word LM of the training transcripts (a user brings LibriSpeech's)
    train_kneser_ney([line.split()[1:] for f in corpus.rglob("*.trans.txt") if f.parts[-4].startswith("train-")
                      for line in f.read_text().splitlines()], 2).write_arpa(word_lm)
    proc = run(recipe, "--corpus-dir", corpus, "--lm-conf", "conf/lm_tiny.yaml", "--train-conf", "conf/train_tiny.yaml",
               "--vocab-size", 40, "--lm-epochs", 1, "--asr-epochs", 2, "--avg", 2, "--nj", 1, "--ngpu", 1,
               "--thresholds", "0.8", "--decode-batch-size", 4, "--ctc-vocab-size", 28, "--lexicon", lexicon,
               "--word-lm", word_lm)
    rows = summary_rows(recipe)
    # beam and mtp-beam-verify also fused with the word LM (no CTC term: the CTC head has its own vocabulary)
    fused = sorted((r["method"], r["test_set"], r["ctc_weight"]) for r in rows if r["word_lm"])
    assert fused == [(m, s, None) for m in ("beam", "mtp-beam-verify") for s in ("test-clean", "test-other")]
    assert all(r["word_lm"] == str(word_lm) and r["lm_weight"] == 0.5 for r in rows if r["word_lm"])
    assert all(r["lexicon"] == str(lexicon) for r in rows if r["method"] != "ctc")
    for recogs in (recipe / "exp").rglob("recogs-*.txt"):
        if "-ctc-ctcB1-bs" in recogs.name:  # the CTC head's best path spells what it hears
            continue
        hyps = [line.split("\thyp=", 1)[1] for line in recogs.read_text().splitlines() if "\thyp=" in line]
        # (the last word may be cut short where the length limit stopped a hypothesis)
        assert all(set(ast.literal_eval(h)[:-1]) <= set(words) for h in hyps), recogs
    assert {r["test_set"] for r in rows} == {"test-clean", "test-other"}
    base = {r["method"] for r in rows if r["checkpoint"] == "avg-epoch-2-avg-2-distilled"}
    assert base == {"ctc", "greedy", "mtp-threshold", "mtp-verify", "ctc-verify", "ctc-rescore", "beam", "mtp-beam",
                    "mtp-beam-verify"}
    # mtp-verify and ctc-verify with the tree fitted on dev, per test part
    assert sorted(r["method"] for r in rows if r["draft_tree"]) == ["ctc-verify"] * 2 + ["mtp-verify"] * 2
    assert (recipe / "exp" / "asr" / "decode" / "draft-tree-24.txt").is_file()
    assert {r["method"] for r in rows if r["checkpoint"] == "epoch-1"} == {"greedy", "mtp-verify", "mtp-beam"}  # MWER
    assert all(r["num_utts"] == 3 for r in rows)
    assert (recipe / "data" / "manifests" / "cuts_train-clean-100.jsonl.gz").is_file()
    # The CTC head has its own 28-piece vocabulary; ctc-verify re-tokenised its drafts (the rows above).
    ckpt = load_checkpoint(recipe / "exp" / "asr" / "avg-epoch-2-avg-2-distilled.pt")
    assert ckpt["model_config"]["encoder"]["ctc_vocab_size"] == 28 and "ctc_tokenizer" in ckpt
    assert "stage 7: distill" in proc.stdout and "stage 11: results table" in proc.stdout
