"""`mtp-asr export`: a checkpoint's model without pickles — safetensors, or the decoder as a Hugging Face LLaMA."""
import json
import logging
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from mtp_asr.model.build import load_speech_model
from mtp_asr.model.hf import save_hf_decoder
from mtp_asr.utils import atomic_dir

logger = logging.getLogger("mtp_asr")

SAFETENSORS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
CTC_TOKENIZER = "ctc_tokenizer.model"  # the CTC head's own vocabulary, when it has one


def export_checkpoint(checkpoint, out_dir, fmt: str = "safetensors") -> Path:
    model, tokenizer, ckpt = load_speech_model(checkpoint)
    out_dir = Path(out_dir)
    if fmt == "hf-decoder":
        with tempfile.TemporaryDirectory() as tmp:
            spm = Path(tmp) / TOKENIZER
            spm.write_bytes(tokenizer.to_bytes())
            save_hf_decoder(model.lm.decoder, out_dir, tokenizer_model=spm, bos_id=tokenizer.bos_id,
                            eos_id=tokenizer.eos_id)
    elif fmt == "safetensors":
        # Tied weights share storage, which safetensors refuses: store each tensor as its own copy.
        tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        with atomic_dir(out_dir, CONFIG) as tmp:  # the files belong together: an old export is replaced as a whole
            save_file(tensors, str(tmp / SAFETENSORS))
            (tmp / TOKENIZER).write_bytes(tokenizer.to_bytes())
            if model.ctc_tokenizer is not None:
                (tmp / CTC_TOKENIZER).write_bytes(model.ctc_tokenizer.to_bytes())
            (tmp / CONFIG).write_text(json.dumps({"kind": "speech_llama", "model_config": ckpt["model_config"]},
                                                 indent=2), encoding="utf-8")
    else:
        raise ValueError(f"unknown export format {fmt!r}")
    logger.info("exported %s as %s to %s", checkpoint, fmt, out_dir)
    return out_dir
