"""Parameter counts of a Speech-LLaMA config, per component and per MTP head kind."""
import copy

import torch

from mtp_asr.config import from_dict
from mtp_asr.model.heads import HEAD_KINDS
from mtp_asr.model.speech_llama import ModelConfig, SpeechLlama


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_table(model_cfg: dict) -> list:
    """Rows (head kind, encoder, adapter, decoder trunk with LM head, heads 2..K, total), one per head kind; built
    on the meta device, so even large configs cost no memory."""
    rows = []
    for kind in HEAD_KINDS:
        cfg = copy.deepcopy(model_cfg)
        cfg.setdefault("heads", {})["kind"] = kind
        with torch.device("meta"):
            model = SpeechLlama(from_dict(ModelConfig, cfg, "model"))
        rows.append({"kind": kind, "K": model.num_heads, "encoder": count(model.encoder),
                     "adapter": count(model.adapter) + model.sep.numel(), "decoder": count(model.lm.decoder),
                     "heads": count(model.lm.heads), "total": count(model)})
    return rows


def markdown(rows: list) -> str:
    lines = ["| heads | K | encoder | adapter | decoder (incl. LM head) | heads 2..K | total |", "|" + "---|" * 7]
    m = lambda n: f"{n / 1e6:.2f}M"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['kind']} | {r['K']} | {m(r['encoder'])} | {m(r['adapter'])} | {m(r['decoder'])} | "
                     f"{m(r['heads'])} | {m(r['total'])} |")
    return "\n".join(lines)
