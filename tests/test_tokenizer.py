"""Sentencepiece: training from cut manifests, LLaMA-style special ids, round trips, determinism, foreign models."""
import gzip

import pytest
import sentencepiece as spm
import torch
from click.testing import CliRunner
from lhotse import CutSet, MonoCut, SupervisionSegment

from mtp_asr.cli import main
from mtp_asr.data.tokenizer import Tokenizer, manifest_texts, train_bpe
from mtp_asr.text import normalize_text

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "It's a truth universally acknowledged.",
    "She sells sea shells by the sea shore",
    "Peter Piper picked a peck of pickled peppers",
    "How much wood would a woodchuck chuck?",
    "Colourless green ideas sleep furiously",
    "A stitch in time saves nine",
    "All that glitters is not gold",
] * 5


@pytest.fixture
def cuts_path(tmp_path):
    """A manifest whose supervisions carry normalised transcripts (no audio is needed to train a tokenizer)."""
    cuts = CutSet.from_cuts(
        MonoCut(
            id=f"c{i}", start=0, duration=1.0, channel=0,
            supervisions=[
                SupervisionSegment(id=f"c{i}", recording_id=f"c{i}", start=0, duration=1.0, text=normalize_text(t))
            ],
        )  # fmt: skip
        for i, t in enumerate(SENTENCES)
    )
    path = tmp_path / "cuts_train.jsonl.gz"
    cuts.to_file(path)
    return path


WORDS = {w for s in SENTENCES for w in normalize_text(s).split()}


@pytest.mark.parametrize(
    "model_type,vocab_size", [("bpe", 60), ("unigram", 60), ("char", 60), ("word", len(WORDS) + 3)]
)
def test_round_trip_gives_normalised_text(model_type, vocab_size, cuts_path, tmp_path):
    model = train_bpe(manifest_texts([cuts_path]), tmp_path / model_type, vocab_size, model_type)
    assert model == tmp_path / model_type / "tokenizer.model"
    assert (tmp_path / model_type / "tokenizer.vocab").is_file()
    tok = Tokenizer(model)
    for sentence in SENTENCES[:8]:
        text = normalize_text(sentence)
        ids = tok.encode(text)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text  # a whole decoded sequence
    texts = [normalize_text(s) for s in SENTENCES[:3]]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_special_ids_are_llama_like(cuts_path, tmp_path):
    tok = Tokenizer(train_bpe(manifest_texts([cuts_path]), tmp_path, 60, "bpe"))
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.sp.pad_id() == -1
    assert [tok.sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert tok.vocab_size == 60
    assert tok.decode(torch.tensor([1, *tok.encode("SEA SHELLS"), 2])) == "SEA SHELLS"


def test_training_is_deterministic(cuts_path, tmp_path):
    a = train_bpe(manifest_texts([cuts_path]), tmp_path / "a", 60, "unigram")
    b = train_bpe(manifest_texts([cuts_path]), tmp_path / "b", 60, "unigram")
    assert a.read_bytes() == b.read_bytes()


def test_bytes_round_trip(cuts_path, tmp_path):
    """The copy a checkpoint carries behaves like the file it came from."""
    tok = Tokenizer(train_bpe(manifest_texts([cuts_path]), tmp_path, 60, "bpe"))
    copy = Tokenizer.from_bytes(tok.to_bytes())
    assert copy.to_bytes() == (tmp_path / "tokenizer.model").read_bytes()
    assert (copy.vocab_size, copy.bos_id, copy.eos_id) == (tok.vocab_size, tok.bos_id, tok.eos_id)
    assert copy.encode("SEA SHELLS") == tok.encode("SEA SHELLS")
    with pytest.raises(ValueError, match="<checkpoint> holds no sentencepiece model"):
        Tokenizer.from_bytes(b"garbage")


def test_ids_are_read_from_a_foreign_model(tmp_path):
    """A model numbered differently (as some Hugging Face tokenizer.model files are) keeps its own ids."""
    prefix = tmp_path / "foreign"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES), model_prefix=str(prefix), vocab_size=50, model_type="bpe",
        unk_id=3, bos_id=0, eos_id=1, pad_id=2, minloglevel=2,
    )  # fmt: skip
    tok = Tokenizer(f"{prefix}.model")
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (3, 0, 1)
    ids = tok.encode("sea shells")
    assert tok.decode([0, *ids, 1]) == "sea shells"


def test_model_without_bos_or_eos_is_refused(tmp_path):
    prefix = tmp_path / "nobos"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES), model_prefix=str(prefix), vocab_size=50, bos_id=-1, minloglevel=2
    )
    with pytest.raises(ValueError, match="no bos or eos"):
        Tokenizer(f"{prefix}.model")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")


def test_too_large_vocabulary_is_a_clear_error(cuts_path, tmp_path):
    with pytest.raises(ValueError, match="bpe training with vocab size 5000 failed.*set it to a value <="):
        train_bpe(manifest_texts([cuts_path]), tmp_path, 5000, "bpe")
    assert not (tmp_path / "tokenizer.model").exists()
    assert list(tmp_path.iterdir()) == [cuts_path]  # no temporary directory left behind


def test_cli_train_bpe_with_extra_text(cuts_path, tmp_path):
    extra = tmp_path / "lm_text.txt"
    extra.write_text("Zebras quizzically vexed!\n\nJumping kangaroos\n")
    out = tmp_path / "lang"
    args = ["train-bpe", str(cuts_path), str(out), "--vocab-size", "80", "--model-type", "unigram"]
    args += ["--extra-text", str(extra)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    tok = Tokenizer(out / "tokenizer.model")
    assert tok.unk_id not in tok.encode("ZEBRAS QUIZZICALLY VEXED")  # Z, Q, V, X only occur in the extra text
    assert tok.decode(tok.encode("ZEBRAS QUIZZICALLY VEXED")) == "ZEBRAS QUIZZICALLY VEXED"

    extra.write_bytes(b"caf\xe9\n")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and f"{extra}:1: byte 3 is not UTF-8" in result.output


def test_manifest_texts_names_a_file_that_is_not_a_cut_manifest(tmp_path):
    empty = tmp_path / "empty.jsonl.gz"
    gzip.open(empty, "wt").close()
    assert list(manifest_texts([empty])) == []
    wrong = tmp_path / "texts.txt"
    wrong.write_text("HELLO\n")
    with pytest.raises(ValueError, match=f"cut manifest {wrong}: expected JSON lines"):
        list(manifest_texts([wrong]))
    recordings = tmp_path / "recordings.jsonl"
    recordings.write_text('{"id": "r1", "sources": [], "sampling_rate": 16000, "num_samples": 16000, '
                          '"duration": 1.0}\n')
    with pytest.raises(ValueError, match=f"{recordings}:1: not a Lhotse cut manifest"):
        list(manifest_texts([recordings]))


def test_normaliser_folds_accents_apostrophes_and_undecomposed_latin_letters():
    assert normalize_text("Café — Søren’s ŒUVRE, Łódź; ‘quoted’ Æsir") == "CAFE SOREN'S OEUVRE LODZ QUOTED AESIR"
