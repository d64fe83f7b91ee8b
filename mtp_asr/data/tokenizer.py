"""The sentencepiece tokenizer: training one from transcripts, and the `Tokenizer` every other module uses.

Models trained here number their specials like LLaMA (unk=0, bos=1, eos=2, no pad piece); `Tokenizer` reads the
ids from the model itself, so a Hugging Face LLaMA `tokenizer.model` loads the same way.
"""
import io
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence

import sentencepiece as spm

from mtp_asr.text import normalize_text
from mtp_asr.utils import atomic_path, atomic_write_text, logger

MODEL_TYPES = ("bpe", "unigram", "char", "word")
MODEL_NAME = "tokenizer.model"


class Tokenizer:
    """A sentencepiece model: text <-> token ids, with its bos/eos/unk ids."""

    def __init__(self, model_path):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model {path} does not exist")
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a sentencepiece model: {e}") from None
        self._check_specials()

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<checkpoint>") -> "Tokenizer":
        """A tokenizer from a serialized model (as stored inside checkpoints)."""
        tok = cls.__new__(cls)
        tok.path = name
        try:
            tok.sp = spm.SentencePieceProcessor(model_proto=data)
        except RuntimeError as e:
            raise ValueError(f"{name} holds no sentencepiece model: {e}") from None
        tok._check_specials()
        return tok

    def to_bytes(self) -> bytes:
        return self.sp.serialized_model_proto()

    def _check_specials(self) -> None:
        if self.sp.bos_id() < 0 or self.sp.eos_id() < 0:
            raise ValueError(f"{self.path} has no bos or eos piece; the decoder prompt needs both "
                             f"(train with `mtp-asr train-bpe`)")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self.sp.encode(list(texts), out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ids (ints or 0-d tensors); bos and eos are dropped, so a whole decoded sequence can be passed."""
        specials = (self.bos_id, self.eos_id)
        return self.sp.decode([int(i) for i in ids if int(i) not in specials])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def train_bpe(texts: Iterable[str], out_dir, vocab_size: int, model_type: str = "bpe") -> Path:
    """Train OUT_DIR/tokenizer.model (+ .vocab) on `texts`; deterministic for the same texts in the same order."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    sentences = [t for t in texts if t.strip()]
    if not sentences:
        raise ValueError("no text to train the tokenizer on")
    model_proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            # In memory: a model_prefix path would be recorded in the model and make it differ per directory.
            model_writer=model_proto,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            # One thread and the whole input (no sampling) make the model a function of the text alone.
            num_threads=1,
            input_sentence_size=0,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"sentencepiece {model_type} training with vocab size {vocab_size} failed: {e}") from None
    sp = spm.SentencePieceProcessor(model_proto=model_proto.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    out_dir = Path(out_dir)
    # The .model goes last: its presence means both files are complete.
    atomic_write_text(out_dir / "tokenizer.vocab", vocab)
    with atomic_path(out_dir / MODEL_NAME) as tmp:
        tmp.write_bytes(model_proto.getvalue())
    model = out_dir / MODEL_NAME
    pieces = sp.get_piece_size()
    logger.info("trained %s tokenizer, %d pieces, on %d sentences -> %s", model_type, pieces, len(sentences), model)
    return model


def manifest_texts(manifests: Iterable) -> Iterator[str]:
    """The supervision texts of cut manifests, in order. A file that is not a cut manifest fails with its name."""
    from mtp_asr.data.dataset import read_cuts  # the dataset module imports this one

    for path in manifests:
        for cut in read_cuts(path, lazy=True):
            for supervision in cut.supervisions:
                if supervision.text:
                    yield supervision.text


def text_file_lines(path) -> Iterator[str]:
    """Normalised non-empty lines of an extra text file (e.g. LM text), so they match the transcripts."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = normalize_text(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: byte {e.start} is not UTF-8") from None
            if text:
                yield text
