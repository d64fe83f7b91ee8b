"""Hugging Face LLaMA checkpoints in and out of our `LlamaDecoder`.

A Hugging Face model directory holds `config.json`, the weights as `model.safetensors` (or shards
`model-0000i-of-0000n.safetensors` listed in `model.safetensors.index.json`) and, for LLaMA 1/2 style models, a
sentencepiece `tokenizer.model`. Tensor names are those of `LlamaForCausalLM`; ours are the same without the `model.`
prefix, so conversion is a rename plus checks. Anything our decoder does not implement (other rope variants, biases,
other activations) is refused when the config is read, naming the file and the key, rather than loading a model that
silently computes something else.
"""
import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mtp_asr.model.llama import LlamaConfig, LlamaDecoder, Rotary
from mtp_asr.utils import Progress, atomic_dir

CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER = "tokenizer.model"
_PREFIX = "model."

# config.json keys without a sensible default; the other keys default as in transformers' LlamaConfig.
_REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def read_hf_config(model_dir) -> LlamaConfig:
    """The `LlamaConfig` of a Hugging Face LLaMA directory; ValueError for what our decoder does not implement."""
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a Hugging Face model directory has a {CONFIG})")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None

    def refuse(key: str, why: str):
        raise ValueError(f"{path}: {key} = {json.dumps(hf.get(key))}: {why}")

    if hf.get("model_type") != "llama":
        refuse("model_type", "only 'llama' checkpoints are supported")
    for key in _REQUIRED_KEYS:
        if not isinstance(hf.get(key), int):
            refuse(key, "missing or not an integer")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            refuse(key, "our decoder's projections have no bias")
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "our decoder's feed-forward is SwiGLU (silu)")
    rope_theta = _rope_theta(hf, path)

    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != hf["hidden_size"]:
        refuse("head_dim", f"our decoder needs head_dim = hidden_size / num_attention_heads "
                           f"({hf['hidden_size']} / {heads})")
    try:
        return LlamaConfig(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads,
            ffn_dim=hf["intermediate_size"],
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _rope_theta(hf: dict, path: Path) -> float:
    """rope_theta from either layout: transformers 4 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`)."""
    params = hf.get("rope_parameters")
    key = "rope_parameters"
    if params is None:
        params, key = hf.get("rope_scaling"), "rope_scaling"
    params = params or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        # LLaMA 3.1+ ("llama3"), linear, dynamic and YaRN scaling change the rotary frequencies; llama.py's Rotary
        # computes the plain ones only.
        raise ValueError(f"{path}: {key} has rope type {rope_type!r}; only unscaled ('default') rotary "
                         f"positions are supported")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _hf_name(name: str) -> str:
    """The name Hugging Face's LlamaForCausalLM gives our decoder's tensor `name`."""
    return name if name == "lm_head.weight" else _PREFIX + name


def _expected_shapes(cfg: LlamaConfig) -> dict:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in LlamaDecoder(cfg).state_dict().items()}


def _weight_files(model_dir: Path) -> dict:
    """{tensor name as stored: file} from the single file or the shard index; checks every shard exists."""
    single, index = model_dir / SINGLE_FILE, model_dir / INDEX_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    if not index.is_file():
        raise FileNotFoundError(
            f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found (only safetensors checkpoints are "
            f"supported; convert pytorch_model.bin files with transformers' save_pretrained)"
        )
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{index}: not a safetensors index with a weight_map ({e!r})") from None
    files = {}
    for shard in sorted(set(weight_map.values())):
        if not (model_dir / shard).is_file():
            raise FileNotFoundError(f"{index} lists shard {shard}, which is missing from {model_dir}")
        with safe_open(model_dir / shard, framework="pt") as f:
            stored = set(f.keys())
        for name in sorted(n for n, s in weight_map.items() if s == shard):
            if name not in stored:
                raise ValueError(f"{index} puts tensor {name} in {shard}, which does not hold it")
            files[name] = model_dir / shard
    return files


def load_hf_state_dict(model_dir, dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
    """Our decoder's state dict (names without `model.`) from a Hugging Face directory, checked against its config.

    Tied embeddings: `lm_head.weight` is the embedding tensor itself. `dtype` casts every tensor as it is read.
    """
    model_dir = Path(model_dir)
    cfg = read_hf_config(model_dir)
    expected = _expected_shapes(cfg)
    files = _weight_files(model_dir)

    ours_by_stored = {_hf_name(k): k for k in expected}
    wanted = {}  # our name -> stored name
    for stored, file in files.items():
        if stored.endswith("rotary_emb.inv_freq"):
            continue  # old transformers saved this derived buffer; we compute it from rope_theta
        if stored == "lm_head.weight" and cfg.tie_embeddings:
            continue  # some exports store the tied copy; like transformers, we use the embedding
        if stored not in ours_by_stored:
            raise ValueError(f"{file}: unexpected tensor {stored} (not part of the {cfg.n_layers}-layer LLaMA "
                             f"that {model_dir / CONFIG} describes)")
        wanted[ours_by_stored[stored]] = stored
    missing = [_hf_name(k) for k in expected if k not in wanted
               and not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing:
        where = model_dir / (SINGLE_FILE if (model_dir / SINGLE_FILE).is_file() else INDEX_FILE)
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{where}: missing tensor(s) {', '.join(missing[:5])}{more}")

    state = {}
    bar = Progress(f"reading {model_dir}", total=len(wanted), unit="tensors")
    for file in sorted(set(files[s] for s in wanted.values())):
        with safe_open(file, framework="pt") as f:
            for ours, stored in wanted.items():
                if files[stored] != file:
                    continue
                t = f.get_tensor(stored)
                if tuple(t.shape) != expected[ours]:
                    raise ValueError(f"{file}: tensor {stored} has shape {tuple(t.shape)}, but "
                                     f"{model_dir / CONFIG} implies {expected[ours]}")
                state[ours] = t.to(dtype) if dtype is not None else t
                bar.update()
    bar.close()
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def load_hf_decoder(model_dir, dtype: Optional[torch.dtype] = None) -> LlamaDecoder:
    """A `LlamaDecoder` with a Hugging Face LLaMA's config and weights (strict), on the CPU.

    dtype None keeps the checkpoint's dtype (that of its embedding); otherwise every tensor is cast to `dtype`.
    """
    model_dir = Path(model_dir)
    cfg = read_hf_config(model_dir)
    state = load_hf_state_dict(model_dir, dtype)
    dtype = dtype or state["embed_tokens.weight"].dtype
    state = {k: v.to(dtype) for k, v in state.items()}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    # Built on the meta device and then given the loaded tensors, so a large model is neither randomly initialised
    # first nor held twice in memory.
    with torch.device("meta"):
        decoder = LlamaDecoder(cfg)
    decoder.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        decoder.lm_head.weight = decoder.embed_tokens.weight  # assign=True made two parameters of one tensor
    decoder.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)  # its buffers are not in the state dict
    return decoder


def hf_tokenizer_path(model_dir) -> Optional[Path]:
    """The sentencepiece `tokenizer.model` of a Hugging Face directory, or None if it has none."""
    path = Path(model_dir) / TOKENIZER
    return path if path.is_file() else None


def hf_config_dict(cfg: LlamaConfig, dtype: torch.dtype, bos_id: Optional[int] = None,
                   eos_id: Optional[int] = None) -> dict:
    """`config.json` for a `LlamaConfig`, in the layout of transformers 4 (which transformers 5 also reads)."""
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": cfg.max_seq_len,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if bos_id is not None:
        out["bos_token_id"] = bos_id
    if eos_id is not None:
        out["eos_token_id"] = eos_id
    return out


def _shards(tensors: dict, max_shard_bytes: Optional[int]) -> list:
    """Group tensors, in order, into shards of at most max_shard_bytes (a bigger tensor gets a shard to itself)."""
    if max_shard_bytes is None:
        return [tensors]
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_hf_decoder(decoder: LlamaDecoder, out_dir, tokenizer_model=None, max_shard_bytes: Optional[int] = None,
                    bos_id: Optional[int] = None, eos_id: Optional[int] = None) -> Path:
    """Export `decoder` as a Hugging Face LLaMA directory that `LlamaForCausalLM.from_pretrained` loads.

    Writes config.json, the weights (one `model.safetensors`, or shards of at most `max_shard_bytes` plus an index)
    and a copy of `tokenizer_model` as tokenizer.model. Everything is written into a temporary directory beside
    `out_dir` that then replaces `out_dir` as a whole, so a failure leaves no partial export. An existing non-empty
    `out_dir` is replaced only if it is itself an export (has a config.json), so a wrong path cannot wipe a folder.
    """
    out_dir = Path(out_dir)
    if tokenizer_model is not None and not Path(tokenizer_model).is_file():
        raise FileNotFoundError(f"tokenizer model {tokenizer_model}: no such file")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive (got {max_shard_bytes})")

    cfg = decoder.cfg
    tensors = {}
    for name, t in decoder.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # Hugging Face re-ties lm_head to the embedding when tie_word_embeddings is true
        tensors[_hf_name(name)] = t.detach()
    dtype = decoder.embed_tokens.weight.dtype

    with atomic_dir(out_dir, CONFIG) as tmp:
        shards = _shards(tensors, max_shard_bytes)
        bar = Progress(f"writing {out_dir}", total=len(tensors), unit="tensors")
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = SINGLE_FILE if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            # safetensors wants contiguous CPU tensors that share no memory with each other.
            save_file({k: v.to("cpu").contiguous() for k, v in shard.items()}, tmp / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            bar.update(len(shard))
        bar.close()
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        if tokenizer_model is not None:
            shutil.copyfile(tokenizer_model, tmp / TOKENIZER)
        (tmp / CONFIG).write_text(json.dumps(hf_config_dict(cfg, dtype, bos_id, eos_id), indent=2) + "\n",
                                  encoding="utf-8")
    return out_dir


