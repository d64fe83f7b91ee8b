"""Models from configs and checkpoints, and the tokenizer that travels inside a checkpoint.

A checkpoint decodes on its own: it holds its model config and its sentencepiece model. Loading checks that the
weights fit the config and that the tokenizer fits the vocabulary, and says what is wrong when they don't.
"""
import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from mtp_asr.config import from_dict, to_dict
from mtp_asr.data.tokenizer import Tokenizer
from mtp_asr.model.lm import MTPLanguageModel
from mtp_asr.model.speech_llama import ModelConfig, SpeechLlama
from mtp_asr.train.checkpoint import CheckpointError, average_state_dicts, epoch_files, load_checkpoint


def tokenizer_tensor(tokenizer: Tokenizer) -> torch.Tensor:
    return torch.frombuffer(bytearray(tokenizer.to_bytes()), dtype=torch.uint8)


def tokenizer_from_checkpoint(ckpt: dict, path, key: str = "tokenizer") -> Tokenizer:
    """The sentencepiece model stored under `key` (the decoder's "tokenizer", or the CTC head's "ctc_tokenizer")."""
    if key not in ckpt:
        raise CheckpointError(f"checkpoint {path} holds no {key}")
    return Tokenizer.from_bytes(ckpt[key].numpy().tobytes(), f"{path} ({key})")


def ctc_tokenizer_from_checkpoint(ckpt: dict, model: SpeechLlama, path) -> Optional[Tokenizer]:
    """The CTC head's own tokenizer, when the model has one (`encoder.ctc_vocab_size` > 0)."""
    size = model.cfg.encoder.ctc_vocab_size
    if not size or not model.cfg.encoder.ctc:
        return None
    if "ctc_tokenizer" not in ckpt:
        raise CheckpointError(f"checkpoint {path} has a CTC head of its own vocabulary ({size} pieces) but holds no "
                              "CTC tokenizer")
    tokenizer = tokenizer_from_checkpoint(ckpt, path, "ctc_tokenizer")
    if tokenizer.vocab_size != size:
        raise CheckpointError(f"the CTC tokenizer in {path} has {tokenizer.vocab_size} pieces but its CTC head has "
                              f"{size} (model.encoder.ctc_vocab_size)")
    return tokenizer


def check_tokenizer(tokenizer: Tokenizer, vocab_size: int, bos_id: int, eos_id: int, what: str) -> None:
    if (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) != (vocab_size, bos_id, eos_id):
        raise ValueError(
            f"tokenizer {tokenizer} does not match {what}: it has {tokenizer.vocab_size} pieces, "
            f"bos {tokenizer.bos_id}, eos {tokenizer.eos_id}; the model expects {vocab_size} pieces, bos {bos_id}, "
            f"eos {eos_id}"
        )


def load_weights(model: nn.Module, state: dict, source) -> None:
    """load_state_dict(strict) with an error that says the checkpoint belongs to another model config."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"shape mismatches ({'; '.join(shapes[:3])})")
        raise CheckpointError(f"{source} was made for a different model config: {'; '.join(parts)}")
    model.load_state_dict(state)


def speech_model_from_config(model_cfg: dict) -> SpeechLlama:
    return SpeechLlama(from_dict(ModelConfig, model_cfg, "model"))


def lm_config_dict(lm: MTPLanguageModel) -> dict:
    return {"decoder": to_dict(lm.decoder.cfg), "heads": to_dict(lm.heads.cfg), "bos_id": lm.bos_id,
            "eos_id": lm.eos_id}


def load_speech_model(path, device="cpu", avg: int = 1) -> tuple[SpeechLlama, Tokenizer, dict]:
    """A SpeechLlama from a checkpoint file (or the average of `avg` epoch files ending at it), in eval mode."""
    path = Path(path)
    ckpt = load_checkpoint(path, mmap=True)
    if ckpt.get("kind") != "speech_llama":
        raise CheckpointError(f"{path} is not a Speech-LLaMA checkpoint (kind: {ckpt.get('kind')!r})")
    model = speech_model_from_config(ckpt["model_config"])
    tokenizer = tokenizer_from_checkpoint(ckpt, path)
    check_tokenizer(tokenizer, model.cfg.decoder.vocab_size, model.cfg.bos_id, model.cfg.eos_id, f"checkpoint {path}")
    state = ckpt["model"] if avg <= 1 else average_state_dicts(averaged_paths(path, avg))
    load_weights(model, state, path)
    model.ctc_tokenizer = ctc_tokenizer_from_checkpoint(ckpt, model, path)
    return model.to(device).eval(), tokenizer, ckpt


def averaged_paths(path: Path, avg: int) -> list:
    """epoch-(N-avg+1) .. epoch-N for `path` = epoch-N.pt."""
    m = re.fullmatch(r"epoch-(\d+)\.pt", path.name)
    if not m:
        raise CheckpointError(f"averaging needs an epoch-N.pt checkpoint, got {path}")
    last = int(m.group(1))
    files = epoch_files(path.parent)
    wanted = list(range(last - avg + 1, last + 1))
    missing = [e for e in wanted if e not in files]
    if missing or wanted[0] < 1:
        raise CheckpointError(f"cannot average {avg} epochs ending at {last}: missing epoch(s) {missing or wanted[0]}"
                              f" in {path.parent}")
    return [files[e] for e in wanted]


def decoder_source_config(source) -> tuple[dict, Optional[Tokenizer]]:
    """The decoder config (and tokenizer, if it has one) of an `init_lm` source: a pretrain-lm checkpoint or a
    Hugging Face LLaMA directory."""
    source = Path(source)
    if source.is_dir():
        from mtp_asr.model.hf import hf_tokenizer_path, read_hf_config

        tok_path = hf_tokenizer_path(source)
        return to_dict(read_hf_config(source)), (Tokenizer(tok_path) if tok_path else None)
    ckpt = load_checkpoint(source, mmap=True)
    if ckpt.get("kind") != "lm":
        raise CheckpointError(f"init_lm {source} is neither a Hugging Face directory nor a pretrain-lm checkpoint")
    return dict(ckpt["lm_config"]["decoder"]), tokenizer_from_checkpoint(ckpt, source)


def init_lm_weights(lm: MTPLanguageModel, source) -> str:
    """Load the decoder trunk (and the MTP heads, when the source has the same kind and number) from `source`."""
    source = Path(source)
    if source.is_dir():
        from mtp_asr.model.hf import load_hf_state_dict

        load_weights(lm.decoder, load_hf_state_dict(source), source)
        _reset_heads_from_lm_head(lm)
        return "decoder"
    ckpt = load_checkpoint(source)
    state = ckpt["model"]
    decoder = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")}
    load_weights(lm.decoder, decoder, source)
    heads = {k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")}
    same = ckpt["lm_config"]["heads"]["kind"] == lm.heads.kind
    if same and heads.keys() == lm.heads.state_dict().keys():
        load_weights(lm.heads, heads, source)
        return "decoder and heads"
    _reset_heads_from_lm_head(lm)
    return "decoder (heads start from its LM head)"


def _reset_heads_from_lm_head(lm: MTPLanguageModel) -> None:
    """Re-run the heads' initialisation so that heads that copy the LM head copy the loaded one."""
    from mtp_asr.model.heads import MTPHeads

    fresh = MTPHeads(lm.heads.cfg, lm.decoder).to(lm.decoder.lm_head.weight.device)
    lm.heads.load_state_dict(fresh.state_dict())
