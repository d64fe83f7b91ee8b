"""Entry points behind `mtp-asr train` and `mtp-asr pretrain-lm`: resolve the config, build the model, run the loop."""
import itertools
import logging
import os
from pathlib import Path

import torch
import yaml

from mtp_asr.config import ConfigError, from_dict, to_dict
from mtp_asr.data.dataset import cut_frames, cut_text, read_cuts
from mtp_asr.data.tokenizer import Tokenizer
from mtp_asr.model.build import check_tokenizer, decoder_source_config, init_lm_weights, load_weights
from mtp_asr.model.lm import MTPLanguageModel
from mtp_asr.model.speech_llama import ModelConfig, SpeechLlama, prompt_positions
from mtp_asr.train.checkpoint import load_checkpoint
from mtp_asr.train.config import LMTrainConfig, SpeechTrainConfig
from mtp_asr.train.tasks import SpeechTask, TextTask
from mtp_asr.train.trainer import Trainer
from mtp_asr.utils import atomic_write_text, setup_logging

logger = logging.getLogger("mtp_asr")

# Decoder settings that an init_lm source fixes (the architecture); others (dropout) stay configurable.
_ARCHITECTURE = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "norm_eps", "rope_theta",
                 "max_seq_len", "tie_embeddings")


def _tokenizer(path: str, what: str) -> Tokenizer:
    if not path:
        raise ConfigError(f"{what}: no tokenizer given (data.tokenizer)")
    return Tokenizer(path)


def _fill_decoder(decoder: dict, tokenizer: Tokenizer, where: str) -> None:
    """Take the vocabulary size from the tokenizer unless the config states it; a stated one must agree."""
    stated = decoder.setdefault("vocab_size", tokenizer.vocab_size)
    if stated != tokenizer.vocab_size:
        raise ConfigError(f"{where}.vocab_size is {stated} but the tokenizer {tokenizer.path} has "
                          f"{tokenizer.vocab_size} pieces: the tokenizer does not match the model")


def resolve_speech_config(data: dict) -> tuple[SpeechTrainConfig, Tokenizer]:
    """Fill in what the sources decide: the decoder architecture and tokenizer of `init_lm`, the vocabulary size and
    special ids from the tokenizer."""
    data = dict(data)
    model = data.setdefault("model", {})
    decoder = model.setdefault("decoder", {})
    tokenizer = None
    if data.get("init_lm"):
        src_decoder, tokenizer = decoder_source_config(data["init_lm"])
        for key in _ARCHITECTURE:
            if key in decoder and decoder[key] != src_decoder[key]:
                raise ConfigError(f"model.decoder.{key} = {decoder[key]} conflicts with init_lm {data['init_lm']} "
                                  f"({src_decoder[key]}); remove it from the config")
            decoder[key] = src_decoder[key]
    if tokenizer is None:
        tokenizer = _tokenizer(data.get("data", {}).get("tokenizer", ""), "train")
    _fill_decoder(decoder, tokenizer, "model.decoder")
    model["bos_id"], model["eos_id"] = tokenizer.bos_id, tokenizer.eos_id
    auto_rate = model.get("audio_position_rate") == "auto"
    if auto_rate:
        model["audio_position_rate"] = 0.0
    cfg = from_dict(SpeechTrainConfig, data, "train config")
    _fill_ctc_vocab(cfg)
    if auto_rate:
        cfg.model.audio_position_rate = measure_audio_position_rate(cfg.data.train_cuts, tokenizer, cfg.model)
    return cfg, tokenizer


def _fill_ctc_vocab(cfg: SpeechTrainConfig) -> None:
    """model.encoder.ctc_vocab_size from data.ctc_tokenizer (the CTC head's own vocabulary); a stated one must agree."""
    stated = cfg.model.encoder.ctc_vocab_size
    if not cfg.data.ctc_tokenizer:
        if stated:
            raise ConfigError(f"model.encoder.ctc_vocab_size is {stated} but no data.ctc_tokenizer is given: the CTC "
                              "head's own vocabulary needs its sentencepiece model")
        return
    if not cfg.model.encoder.ctc:
        raise ConfigError(f"data.ctc_tokenizer {cfg.data.ctc_tokenizer} is given but the model has no CTC head "
                          "(model.encoder.ctc: false)")
    size = Tokenizer(cfg.data.ctc_tokenizer).vocab_size
    if stated and stated != size:
        raise ConfigError(f"model.encoder.ctc_vocab_size is {stated} but the CTC tokenizer {cfg.data.ctc_tokenizer} "
                          f"has {size} pieces")
    cfg.model.encoder.ctc_vocab_size = size


def measure_audio_position_rate(cut_paths, tokenizer: Tokenizer, model: ModelConfig, max_cuts: int = 5000) -> float:
    """Transcript tokens per audio embedding on (the first `max_cuts` of) the training cuts, to 2 decimals."""
    cuts = itertools.islice(itertools.chain.from_iterable(read_cuts(p, lazy=True) for p in cut_paths), max_cuts)
    tokens = embeddings = n = 0
    for n, cut in enumerate(cuts, 1):
        tokens += len(tokenizer.encode(cut_text(cut)))
        embeddings += prompt_positions(cut_frames(cut), model) - 2
    if not tokens:
        raise ConfigError(f"model.audio_position_rate: auto needs transcribed training cuts; {list(cut_paths)} "
                          "hold none")
    rate = round(tokens / embeddings, 2)
    logger.info("model.audio_position_rate: auto = %.2f transcript tokens per audio embedding (%d training cuts)",
                rate, n)
    return rate


def train_speech(config: dict, exp_dir, resume: bool = True, ctc_only: bool = False) -> int:
    exp_dir = Path(exp_dir)
    _logging(exp_dir, "train")
    cfg, tokenizer = resolve_speech_config(config)
    torch.manual_seed(cfg.seed)
    model = SpeechLlama(cfg.model)
    if cfg.data.ctc_tokenizer:
        model.ctc_tokenizer = Tokenizer(cfg.data.ctc_tokenizer)
    if cfg.init_lm:
        what = init_lm_weights(model.lm, cfg.init_lm)
        logger.info("initialised the %s from %s", what, cfg.init_lm)
    if cfg.init_encoder:
        src = load_checkpoint(cfg.init_encoder)
        enc = {k[len("encoder."):]: v for k, v in src["model"].items() if k.startswith("encoder.")}
        load_weights(model.encoder, enc, cfg.init_encoder)
        _check_ctc_labels(src, model.ctc_tokenizer or tokenizer, cfg.init_encoder)
        logger.info("initialised the encoder from %s", cfg.init_encoder)
    check_tokenizer(tokenizer, cfg.model.decoder.vocab_size, cfg.model.bos_id, cfg.model.eos_id, "the model config")
    _save_config(exp_dir, to_dict(cfg))
    task = SpeechTask(model, cfg, tokenizer, ctc_only=ctc_only)
    return Trainer(task, cfg, exp_dir, to_dict(cfg), resume=resume).run()


def _check_ctc_labels(src: dict, tokenizer: Tokenizer, path) -> None:
    """An init_encoder's CTC head must have been trained on the pieces this model's CTC head predicts: two
    tokenizers of the same size would load without complaint and train on shuffled labels."""
    src_tok = src.get("ctc_tokenizer", src.get("tokenizer"))
    if "encoder.ctc_head.weight" in src["model"] and src_tok is not None:
        if src_tok.numpy().tobytes() != tokenizer.to_bytes():
            raise ConfigError(f"init_encoder {path}: its CTC head was trained with another tokenizer than this "
                              f"model's CTC head uses ({tokenizer.path}); give the same data.ctc_tokenizer (or "
                              "data.tokenizer) as the run that made it")


def train_lm(config: dict, exp_dir, resume: bool = True) -> int:
    exp_dir = Path(exp_dir)
    _logging(exp_dir, "pretrain-lm")
    data = dict(config)
    tokenizer = _tokenizer(data.get("data", {}).get("tokenizer", ""), "pretrain-lm")
    _fill_decoder(data.setdefault("decoder", {}), tokenizer, "decoder")
    cfg = from_dict(LMTrainConfig, data, "pretrain-lm config")
    torch.manual_seed(cfg.seed)
    lm = MTPLanguageModel(cfg.decoder, cfg.heads, tokenizer.bos_id, tokenizer.eos_id)
    _save_config(exp_dir, to_dict(cfg))
    return Trainer(TextTask(lm, cfg, tokenizer), cfg, exp_dir, to_dict(cfg), resume=resume).run()


def _logging(exp_dir: Path, name: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(log_file=exp_dir / "log" / f"log-{name}-rank{rank}.txt")


def _save_config(exp_dir: Path, cfg: dict) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        atomic_write_text(exp_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))


def train_mwer(config: dict, exp_dir, init_checkpoint, resume: bool = True) -> int:
    """MWER fine-tuning of a trained model: its architecture and tokenizer come from `init_checkpoint`."""
    from mtp_asr.model.build import load_speech_model
    from mtp_asr.train.mwer import MWERConfig, MWERTask

    exp_dir = Path(exp_dir)
    _logging(exp_dir, "mwer")
    model, tokenizer, ckpt = load_speech_model(init_checkpoint)
    data = dict(config)
    if data.get("model") and data["model"] != ckpt["model_config"]:
        raise ConfigError(f"mwer: the model comes from {init_checkpoint}; remove the `model` section from the config")
    data["model"] = ckpt["model_config"]
    data.setdefault("data", {})["tokenizer"] = ""
    cfg = from_dict(MWERConfig, data, "mwer config")
    torch.manual_seed(cfg.seed)
    model.train()
    _save_config(exp_dir, to_dict(cfg))
    return Trainer(MWERTask(model, cfg, tokenizer), cfg, exp_dir, to_dict(cfg), resume=resume).run()
