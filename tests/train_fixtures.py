"""A tiny learnable "speech" corpus for training tests: each word is a fixed random 80-dim frame pattern, so a small
model can learn to transcribe it in seconds. Real Lhotse cuts with features in a Lilcom archive, a real
sentencepiece model, and YAML configs as a recipe would write them."""
from pathlib import Path

import numpy as np
import yaml
from lhotse import CutSet, LilcomChunkyWriter, MonoCut, SupervisionSegment
from lhotse.features.base import Features

from mtp_asr.data.tokenizer import train_bpe

WORDS = ["RED", "GREEN", "BLUE", "CAT", "DOG", "RUNS", "SITS", "THE", "A", "BIG", "SMALL", "NOW"]
FRAMES_PER_WORD = 12


def write_feature_cuts(path: Path, sentences, seed: int, frames_per_word: int = FRAMES_PER_WORD) -> Path:
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(1234).normal(size=(len(WORDS), 80)).astype(np.float32)
    cuts = []
    with LilcomChunkyWriter(str(path.parent / f"{path.name.split('.')[0]}-feats")) as writer:
        for i, sentence in enumerate(sentences):
            frames = [np.repeat(patterns[WORDS.index(w)][None], frames_per_word, 0) for w in sentence.split()]
            feats = np.concatenate([np.zeros((4, 80), np.float32)] + frames + [np.zeros((4, 80), np.float32)])
            feats = feats + 0.1 * rng.normal(size=feats.shape).astype(np.float32)
            cut_id = f"{path.name.split('.')[0]}-{i:04d}"
            key = writer.write(cut_id, feats)
            duration = feats.shape[0] * 0.01
            features = Features(type="fbank", num_frames=feats.shape[0], num_features=80, frame_shift=0.01,
                                sampling_rate=16000, start=0.0, duration=duration, storage_type=writer.name,
                                storage_path=writer.storage_path, storage_key=key)
            sup = SupervisionSegment(id=cut_id, recording_id=cut_id, start=0.0, duration=duration, text=sentence)
            cuts.append(MonoCut(id=cut_id, start=0.0, duration=duration, channel=0, supervisions=[sup],
                                features=features))
    CutSet.from_cuts(cuts).to_file(path)
    return path


def random_sentences(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(2, 6))) for _ in range(n)]


def make_corpus(root: Path, n_train: int = 24, n_valid: int = 6, frames_per_word: int = FRAMES_PER_WORD) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    train_sents, valid_sents = random_sentences(n_train, 1), random_sentences(n_valid, 2)
    train = write_feature_cuts(root / "cuts_train.jsonl.gz", train_sents, 1, frames_per_word)
    valid = write_feature_cuts(root / "cuts_valid.jsonl.gz", valid_sents, 2, frames_per_word)
    tokenizer = train_bpe(train_sents + valid_sents + [" ".join(WORDS)], root / "lang", vocab_size=15,
                          model_type="word")
    text = root / "text.txt"
    text.write_text("\n".join(train_sents) + "\n")
    return {"train": train, "valid": valid, "tokenizer": tokenizer, "text": text, "sentences": train_sents}


def tiny_train_config(corpus: dict, **overrides) -> dict:
    cfg = {
        "model": {
            "encoder": {"dim": 32, "num_layers": 1, "num_heads": 2, "ffn_dim": 64, "conv_kernel": 3, "dropout": 0.0},
            "adapter": {"stack": 2},
            "decoder": {"dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 256},
            "heads": {"num_heads": 2, "kind": "latent"},
        },
        "data": {"train_cuts": [str(corpus["train"])], "valid_cuts": [str(corpus["valid"])],
                 "tokenizer": str(corpus["tokenizer"]), "max_duration": 3.0},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "ctc_weight": 0.3,
        "num_epochs": 2,
        "log_interval": 2,
        "seed": 7,
    }
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path
