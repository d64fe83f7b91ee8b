"""Training: configs, the loop's faults, exact resume, checkpoint averaging and export, torchrun with two ranks."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mtp_asr.config import ConfigError, apply_overrides, from_dict, load_yaml
from mtp_asr.model.build import load_speech_model
from mtp_asr.train.average import average_epochs
from mtp_asr.train.checkpoint import CheckpointError, load_checkpoint
from mtp_asr.train.config import SpeechTrainConfig
from mtp_asr.train.run import train_lm, train_speech
from mtp_asr.train.trainer import TrainingError

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import make_corpus, tiny_train_config, write_config  # noqa: E402

MTP_ASR = shutil.which("mtp-asr") or str(Path(sys.executable).parent / "mtp-asr")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def params(path) -> dict:
    return load_checkpoint(path)["model"]


def same_params(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- configs ------------------------------------------------------------------------------------------------------
def test_unknown_key_is_named(corpus):
    cfg = tiny_train_config(corpus)
    cfg["model"]["encoder"]["dimm"] = 3
    with pytest.raises(ConfigError, match=r"model\.encoder: unknown key\(s\) dimm"):
        train_speech(cfg, "/nonexistent-should-not-be-created")


def test_bad_values_are_named(corpus):
    for key, value, pattern in [("model.heads.num_heads", 0, "num_heads must be >= 1"),
                                ("model.heads.kind", "mlp", "heads.kind must be one of"),
                                ("ctc_weight", -1.0, "ctc_weight must be >= 0"),
                                ("data.max_duration", -5.0, "max_duration"),
                                ("freeze", ["trunk"], "unknown part"),
                                ("num_epochs", 0, "num_epochs must be >= 1"),  # max_steps only caps them
                                ("optim.lr", "fast", r"optim\.lr must be of type float")]:
        with pytest.raises(ConfigError, match=pattern):
            from_dict(SpeechTrainConfig, apply_overrides(tiny_train_config(corpus), [f"{key}={value}"]))


def test_malformed_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {encoder: [1, 2\n")
    with pytest.raises(ConfigError, match="malformed YAML in .*bad.yaml"):
        load_yaml(bad)


def test_tokenizer_must_match_the_model(corpus, tmp_path):
    cfg = tiny_train_config(corpus)
    cfg["model"]["decoder"]["vocab_size"] = 99
    with pytest.raises(ConfigError, match="tokenizer does not match the model"):
        train_speech(cfg, tmp_path / "exp")


# ---- training, initialisation, averaging, export --------------------------------------------------------------------
def test_lm_then_speech_training_with_init(corpus, tmp_path):
    lm_cfg = {"decoder": {"dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 256},
              "heads": {"num_heads": 2, "kind": "latent"},
              "data": {"train_text": [str(corpus["text"])], "valid_text": [str(corpus["text"])],
                       "tokenizer": str(corpus["tokenizer"]), "max_tokens": 64},
              "optim": {"lr": 3e-3, "warmup_steps": 2}, "num_epochs": 2, "log_interval": 1}
    assert train_lm(lm_cfg, tmp_path / "lm") == 0
    lm_state = params(tmp_path / "lm" / "epoch-2.pt")
    assert (tmp_path / "lm" / "tensorboard").is_dir() and any((tmp_path / "lm" / "tensorboard").iterdir())

    cfg = tiny_train_config(corpus, init_lm=str(tmp_path / "lm" / "epoch-2.pt"), num_epochs=1)
    cfg["model"].pop("decoder")  # the architecture comes from the LM
    cfg["optim"]["lr"] = 1e-12  # (almost) no update: the loaded weights must survive as they are
    assert train_speech(cfg, tmp_path / "asr") == 0
    asr_state = params(tmp_path / "asr" / "epoch-1.pt")
    for k, v in lm_state.items():
        assert torch.allclose(asr_state[f"lm.{k}"], v, atol=1e-6), k


def test_lm_text_longer_than_the_decoder_is_left_out_with_a_warning(corpus, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text(corpus["text"].read_text() + " ".join(["RED GREEN BLUE"] * 40) + "\n")
    lm_cfg = {"decoder": {"dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64},
              "heads": {"num_heads": 2, "kind": "latent"},
              "data": {"train_text": [str(long)], "tokenizer": str(corpus["tokenizer"]), "max_tokens": 64},
              "optim": {"lr": 3e-3, "warmup_steps": 2}, "num_epochs": 1}
    assert train_lm(lm_cfg, tmp_path / "lm") == 0
    log = (tmp_path / "lm" / "log" / "log-pretrain-lm-rank0.txt").read_text()
    assert f"training text file {long}: skipping 1 of" in log and "longer than 63 tokens" in log


def test_model_info_of_the_demo_config():
    """The demo's config sets audio_position_rate: auto, which only `train` can measure; the counts need no rate."""
    from click.testing import CliRunner

    from mtp_asr.cli import main
    from mtp_asr.model.heads import extra_head_params

    conf = Path(__file__).parents[1] / "egs" / "synth" / "asr" / "conf"
    result = CliRunner().invoke(main, ["model-info", "-c", str(conf / "train.yaml"), "--decoder-config",
                                       str(conf / "lm.yaml"), "--vocab-size", "30"])
    assert result.exit_code == 0, result.output
    rows = {line.split("|")[1].strip(): line for line in result.output.splitlines()[2:]}
    assert set(rows) == {"linear", "latent", "medusa", "layer", "hydra"}
    latent_heads = float(rows["latent"].split("|")[6].strip().rstrip("M"))
    assert latent_heads == round(extra_head_params("latent", 4, 192, 30) / 1e6, 2)


def test_heads_only_training_leaves_the_rest_untouched(corpus, tmp_path):
    from mtp_asr.model.speech_llama import SpeechLlama
    from mtp_asr.train.run import resolve_speech_config

    cfg = tiny_train_config(corpus, num_epochs=1, freeze=["encoder", "adapter", "decoder"])
    assert train_speech(cfg, tmp_path / "exp") == 0
    resolved, _ = resolve_speech_config(cfg)
    torch.manual_seed(resolved.seed)
    initial = SpeechLlama(resolved.model).state_dict()
    after = params(tmp_path / "exp" / "epoch-1.pt")
    for k, v in initial.items():
        if k.startswith("lm.heads."):
            assert not torch.equal(v, after[k]), f"{k} should have been trained"
        else:
            assert torch.equal(v, after[k]), f"{k} should be frozen"


def test_auto_audio_position_rate_is_measured_and_saved(corpus, tmp_path):
    """`model.audio_position_rate: auto` becomes transcript tokens per audio embedding on the training cuts, counted
    here with the model's own encoder and adapter, and the trained checkpoint keeps that number."""
    from lhotse import load_manifest

    from mtp_asr.data.dataset import AsrDataset
    from mtp_asr.model.speech_llama import SpeechLlama
    from mtp_asr.train.run import resolve_speech_config

    cfg = tiny_train_config(corpus, num_epochs=1, **{"model.audio_position_rate": "auto"})
    resolved, tokenizer = resolve_speech_config(yaml.safe_load(yaml.safe_dump(cfg)))
    batch = AsrDataset(tokenizer)[load_manifest(corpus["train"])]
    with torch.no_grad():
        embeddings = SpeechLlama(resolved.model).encode(batch["feats"], batch["feat_lens"]).audio_lens.sum()
    tokens = sum(len(t) for t in batch["tokens"])
    assert resolved.model.audio_position_rate == round(tokens / int(embeddings), 2) > 0
    assert train_speech(cfg, tmp_path / "exp") == 0
    model, _, _ = load_speech_model(tmp_path / "exp" / "epoch-1.pt")
    assert model.cfg.audio_position_rate == resolved.model.audio_position_rate
    assert model.lm.prefix_rate == resolved.model.audio_position_rate


def test_average_is_the_mean_and_decodes(corpus, tmp_path):
    assert train_speech(tiny_train_config(corpus, num_epochs=2), tmp_path / "exp") == 0
    out = average_epochs(tmp_path / "exp", 2, 2)
    a, b, avg = params(tmp_path / "exp" / "epoch-1.pt"), params(tmp_path / "exp" / "epoch-2.pt"), params(out)
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(avg[k], (a[k].double() + b[k].double()).div(2).to(a[k].dtype), atol=1e-7), k
    model, tokenizer, _ = load_speech_model(out)
    assert tokenizer.vocab_size == model.cfg.decoder.vocab_size
    with pytest.raises(CheckpointError, match="missing epoch"):
        average_epochs(tmp_path / "exp", 2, 3)


def test_checkpoint_from_another_config_is_refused(corpus, tmp_path):
    assert train_speech(tiny_train_config(corpus, num_epochs=1), tmp_path / "exp") == 0
    ckpt = load_checkpoint(tmp_path / "exp" / "epoch-1.pt")
    ckpt["model_config"]["encoder"]["dim"] = 48
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="different model config.*shape mismatches"):
        load_speech_model(tmp_path / "other.pt")


class Payload:
    """Any class outside torch's allow-list: loading it would mean unpickling arbitrary code."""


def test_pickled_checkpoint_is_refused(tmp_path):
    torch.save({"model": {}, "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(tmp_path / "evil.pt")


def test_nonfinite_losses_are_skipped_saved_and_bounded(corpus, tmp_path, monkeypatch):
    from mtp_asr.train import tasks

    real_loss = tasks.SpeechTask.loss
    calls = {"n": 0}

    def sometimes_nan(self, model, batch):
        out = real_loss(self, model, batch)
        calls["n"] += 1
        if model.training and calls["n"] in (2, 3):
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(tasks.SpeechTask, "loss", sometimes_nan)
    assert train_speech(tiny_train_config(corpus, num_epochs=1), tmp_path / "exp") == 0
    bad = sorted((tmp_path / "exp").glob("bad-batch-*.pt"))
    assert len(bad) == 2
    saved = load_checkpoint(bad[0])
    assert saved["cut_ids"] and saved["feats"].dim() == 3

    monkeypatch.setattr(tasks.SpeechTask, "loss", lambda self, model, batch: _nan(real_loss(self, model, batch)))
    with pytest.raises(TrainingError, match="non-finite loss"):
        train_speech(tiny_train_config(corpus, num_epochs=1, max_bad_batches=2), tmp_path / "exp2")


def _nan(out):
    out.loss = out.loss * float("nan")
    return out


def test_a_nonfinite_batch_keeps_the_gradients_accumulated_before_it(corpus, tmp_path, monkeypatch):
    """accum_grad 2 with batch 2 non-finite: the first step's gradient is the mean of batches 1 and 3. A learning
    rate far below float32's resolution keeps the parameters fixed, so every batch's gradient is taken at one point
    and the accum_grad 1 run gives them one by one."""
    from mtp_asr.train import tasks
    from mtp_asr.train.trainer import Trainer

    real_loss, real_step = tasks.SpeechTask.loss, Trainer._optimizer_step
    grads, calls = [], {"n": 0, "nan_at": 0}

    def record(self):
        grads.append([None if p.grad is None else p.grad.clone() for p in self.model.parameters()])
        return real_step(self)

    def loss(self, model, batch):
        out = real_loss(self, model, batch)
        calls["n"] += 1
        return _nan(out) if model.training and calls["n"] == calls["nan_at"] else out

    monkeypatch.setattr(Trainer, "_optimizer_step", record)
    monkeypatch.setattr(tasks.SpeechTask, "loss", loss)
    base = {"num_epochs": 1, "optim.lr": 1e-30, "optim.grad_clip": 0.0, "spec_augment.enabled": False}
    assert train_speech(tiny_train_config(corpus, max_steps=3, **base), tmp_path / "one") == 0
    g1, _, g3 = grads
    grads.clear()
    calls.update(n=0, nan_at=2)
    assert train_speech(tiny_train_config(corpus, max_steps=1, **{"optim.accum_grad": 2}, **base),
                        tmp_path / "two") == 0
    (step,) = grads
    assert any(g is not None for g in step)
    for got, a, b in zip(step, g1, g3):
        if got is not None:
            assert torch.allclose(got, (a + b) / 2, atol=1e-6)


def test_out_of_memory_batch_is_skipped_and_logged(corpus, tmp_path, monkeypatch):
    """What a GPU does on a batch too large for it, raised on the CPU: the batch is skipped, the run goes on."""
    from mtp_asr.train import tasks

    real_loss = tasks.SpeechTask.loss
    calls = {"n": 0}

    def oom_once(self, model, batch):
        calls["n"] += 1
        if model.training and calls["n"] == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_loss(self, model, batch)

    monkeypatch.setattr(tasks.SpeechTask, "loss", oom_once)
    exp = tmp_path / "exp"
    assert train_speech(tiny_train_config(corpus, num_epochs=1), exp) == 0
    log = (exp / "log" / "log-train-rank0.txt").read_text()
    assert "out of GPU memory on a batch of" in log and "skipping it" in log
    assert (exp / "epoch-1.pt").is_file() and not list(exp.glob("bad-batch-*"))


def test_export_safetensors_and_hf_decoder(corpus, tmp_path):
    assert train_speech(tiny_train_config(corpus, num_epochs=1), tmp_path / "exp") == 0
    from safetensors.torch import load_file

    from mtp_asr.model.hf import load_hf_decoder
    from mtp_asr.train.export import export_checkpoint

    export_checkpoint(tmp_path / "exp" / "epoch-1.pt", tmp_path / "st", "safetensors")
    tensors = load_file(str(tmp_path / "st" / "model.safetensors"))
    assert same_params(tensors, params(tmp_path / "exp" / "epoch-1.pt"))
    assert (tmp_path / "st" / "tokenizer.model").stat().st_size > 0
    # A new export replaces the old one as a whole (nothing stale stays beside it); a folder that is not an export
    # is never replaced.
    (tmp_path / "st" / "ctc_tokenizer.model").write_bytes(b"from an older export")
    export_checkpoint(tmp_path / "exp" / "epoch-1.pt", tmp_path / "st", "safetensors")
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["config.json", "model.safetensors",
                                                                    "tokenizer.model"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="notes: exists and is not a model export"):
        export_checkpoint(tmp_path / "exp" / "epoch-1.pt", tmp_path / "notes", "safetensors")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    export_checkpoint(tmp_path / "exp" / "epoch-1.pt", tmp_path / "hf", "hf-decoder")
    decoder = load_hf_decoder(tmp_path / "hf")
    state = params(tmp_path / "exp" / "epoch-1.pt")
    for k, v in decoder.state_dict().items():
        assert torch.equal(v, state[f"lm.decoder.{k}"]), k


# ---- processes: signals, resume, torchrun -----------------------------------------------------------------------------
def run_cli(*args, cwd, env=None, timeout=600):
    return subprocess.run([MTP_ASR, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_sigterm_then_resume_equals_uninterrupted(corpus, tmp_path):
    cfg = write_config(tmp_path / "train.yaml", tiny_train_config(corpus, save_every_n=2, keep_last_k=50))
    assert run_cli("train", "-c", cfg, "--exp-dir", tmp_path / "full", cwd=tmp_path).returncode == 0

    proc = subprocess.Popen([MTP_ASR, "train", "-c", str(cfg), "--exp-dir", str(tmp_path / "cut")], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "cut" / "checkpoint-2.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, log
    assert "stopped by signal 15" in log
    resumed = run_cli("train", "-c", cfg, "--exp-dir", tmp_path / "cut", cwd=tmp_path)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr
    assert same_params(params(tmp_path / "full" / "epoch-2.pt"), params(tmp_path / "cut" / "epoch-2.pt"))


@pytest.mark.slow
def test_torchrun_two_processes_keep_identical_parameters(corpus, tmp_path):
    cfg = write_config(tmp_path / "train.yaml", tiny_train_config(corpus, num_epochs=1))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", MTP_ASR, "train",
         "-c", str(cfg), "--exp-dir", str(tmp_path / "ddp"), "--set", "device=cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [(tmp_path / "ddp" / "log" / f"log-train-rank{r}.txt").read_text() for r in (0, 1)]
    prints = [next(line.split("fingerprint on rank")[1].split(":")[1].strip()
                   for line in log.splitlines() if "parameter fingerprint" in line) for log in logs]
    assert prints[0] == prints[1]
    assert "world size 2" in logs[0]
    assert (tmp_path / "ddp" / "epoch-1.pt").is_file()
    assert yaml.safe_load((tmp_path / "ddp" / "config.yaml").read_text())["num_epochs"] == 1
