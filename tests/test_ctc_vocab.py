"""A CTC head with its own vocabulary (characters under a word- or BPE-level decoder, as under a pretrained LLM's
tokenizer): training targets, checkpoints, config checks, and ctc-verify re-tokenising its drafts."""
import logging
import sys
from pathlib import Path

import kaldialign
import pytest
import torch
from lhotse import CutSet

from mtp_asr.config import ConfigError
from mtp_asr.data.audio import load_audio
from mtp_asr.data.dataset import AsrDataset, read_cuts
from mtp_asr.data.fbank import fbank_extractor
from mtp_asr.data.tokenizer import Tokenizer, train_bpe
from mtp_asr.decode.drafts import ctc_drafts
from mtp_asr.decode.generate import generate
from mtp_asr.decode.run import transcribe_files
from mtp_asr.decode.runner import DecodeSettings, decode_cuts
from mtp_asr.model.build import load_speech_model
from mtp_asr.train.average import average_epochs
from mtp_asr.train.checkpoint import CheckpointError, load_checkpoint
from mtp_asr.train.export import export_checkpoint
from mtp_asr.train.run import resolve_speech_config, train_speech

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import WORDS, make_corpus, tiny_train_config  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    # Characters need more frames than words: 24 per word, x2 subsampling, 12 encoder frames for up to 7 characters.
    corpus = make_corpus(root, n_train=48, frames_per_word=24)
    corpus["chars"] = train_bpe([" ".join(WORDS)] + corpus["sentences"], root / "lang_char", 40, "char")
    return corpus


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """CTC pre-training on characters, then Speech-LLaMA (word-level decoder) from that encoder."""
    exp = tmp_path_factory.mktemp("exp")
    chars = str(corpus["chars"])
    ctc = tiny_train_config(corpus, **{"data.ctc_tokenizer": chars, "num_epochs": 40, "model.encoder.subsampling": 2})
    ctc["optim"]["lr"] = 1e-2
    assert train_speech(ctc, exp / "ctc", ctc_only=True) == 0
    asr = tiny_train_config(corpus, **{"data.ctc_tokenizer": chars, "init_encoder": str(exp / "ctc" / "epoch-40.pt"),
                                       "num_epochs": 20, "model.encoder.subsampling": 2, "model.adapter.stack": 4})
    assert train_speech(asr, exp / "asr") == 0
    return exp


def test_ctc_head_takes_the_size_of_its_own_tokenizer(corpus, trained):
    chars = Tokenizer(corpus["chars"])
    words = Tokenizer(corpus["tokenizer"])
    assert chars.vocab_size != words.vocab_size
    for path in (trained / "ctc" / "epoch-40.pt", trained / "asr" / "epoch-20.pt"):
        ckpt = load_checkpoint(path)
        assert ckpt["model"]["encoder.ctc_head.weight"].shape[0] == chars.vocab_size + 1
        assert ckpt["model"]["lm.decoder.lm_head.weight"].shape[0] == words.vocab_size
        assert ckpt["model_config"]["encoder"]["ctc_vocab_size"] == chars.vocab_size
        assert bytes(ckpt["ctc_tokenizer"].numpy().tobytes()) == chars.to_bytes()
    model, tokenizer, _ = load_speech_model(trained / "asr" / "epoch-20.pt")
    assert model.ctc_tokenizer.to_bytes() == chars.to_bytes()
    assert tokenizer.to_bytes() == words.to_bytes()


def test_ctc_pretraining_learns_the_characters(corpus, trained):
    """The CTC loss is computed on character targets: after pre-training, CTC greedy spells the dev transcripts
    (under 15% character errors; untrained, it emits nothing)."""
    model, _, _ = load_speech_model(trained / "ctc" / "epoch-40.pt")
    cuts = read_cuts(corpus["valid"])
    batch = AsrDataset(None)[cuts]
    with torch.no_grad():
        frames, lens = model.encoder(batch["feats"], batch["feat_lens"])
        ids = ctc_drafts(model.encoder.ctc_log_probs(frames), lens, model.encoder.blank_id)
    texts = [model.ctc_tokenizer.decode(d) for d in ids]
    errors = sum(kaldialign.edit_distance(list(ref), list(hyp))["total"] for ref, hyp in zip(batch["texts"], texts))
    assert errors <= 0.15 * sum(len(ref) for ref in batch["texts"]), list(zip(texts, batch["texts"]))


def test_ctc_method_is_the_ctc_heads_best_path_without_decoder_calls(corpus, trained, tmp_path):
    model, tokenizer, _ = load_speech_model(trained / "asr" / "epoch-20.pt")
    cuts = read_cuts(corpus["valid"])
    res = decode_cuts(model, tokenizer, cuts, DecodeSettings("ctc", ctc_beam_size=1), batch_size=3)
    batch = AsrDataset(None)[cuts]
    with torch.no_grad():
        frames, lens = model.encoder(batch["feats"], batch["feat_lens"])
        ids = ctc_drafts(model.encoder.ctc_log_probs(frames), lens, model.encoder.blank_id)
    spelled = dict(zip(batch["cut_ids"], (model.ctc_tokenizer.decode(d) for d in ids)))
    assert {cut_id: hyp for cut_id, _, hyp in res.results} == spelled
    assert any(spelled.values())
    summary = res.summary()
    assert summary["num_decoder_calls"] == 0 and summary["tokens_per_call"] is None
    assert res.encoder_seconds > 0  # (the decoder seconds time the CTC search: no decoder call)
    # With a lexicon (spelled in the CTC head's own characters), a prefix beam search keeps to its words.
    lexicon = tmp_path / "words.txt"
    lexicon.write_text("\n".join(WORDS) + "\n")
    constrained = decode_cuts(model, tokenizer, cuts, DecodeSettings("ctc", lexicon=str(lexicon)), batch_size=3)
    words = [w for _, _, hyp in constrained.results for w in hyp.split()]
    assert words and set(words) <= set(WORDS)
    assert constrained.summary()["ctc_beam_size"] == 16 and constrained.num_decoder_calls == 0


def test_ctc_verify_retokenises_drafts_and_equals_greedy(corpus, trained, tmp_path):
    path = average_epochs(trained / "asr", 20, 2, tmp_path / "avg.pt")
    model, tokenizer, _ = load_speech_model(path)
    assert model.ctc_tokenizer is not None  # averaging keeps it
    cuts = read_cuts(corpus["valid"]) + read_cuts(corpus["train"]).subset(first=10)
    greedy = decode_cuts(model, tokenizer, cuts, DecodeSettings("greedy"), batch_size=4)
    verify = decode_cuts(model, tokenizer, cuts, DecodeSettings("ctc-verify"), batch_size=4)
    single = decode_cuts(model, tokenizer, cuts, DecodeSettings("ctc-verify"), batch_size=1)
    assert verify.tokens == greedy.tokens == single.tokens
    assert verify.accepted_from_ctc > 0
    assert verify.num_decoder_calls < greedy.num_decoder_calls

    # CTC posteriors that spell the greedy transcript in the CTC head's characters: re-tokenised, the draft is the
    # greedy output in decoder tokens and is accepted whole, in one call.
    batch = AsrDataset(None)[cuts]
    ref = [greedy.tokens[c] for c in batch["cut_ids"]]
    log_probs, lens = spelling_posteriors(model.ctc_tokenizer, [tokenizer.decode(t) for t in ref])
    drafts = ctc_drafts(log_probs, lens, model.encoder.blank_id, model.ctc_tokenizer, tokenizer)
    assert drafts == ref
    with torch.no_grad():
        enc = model.encode(batch["feats"], batch["feat_lens"])
        prefix, prefix_lens = model.prompt(enc.audio, enc.audio_lens)
        out = generate(model.lm, prefix, prefix_lens, "ctc-verify", drafts=drafts, max_new_tokens=40)
    assert [h.tokens for h in out.hyps] == ref
    assert all(h.decoder_calls == 1 for h in out.hyps if h.finished) and any(h.finished for h in out.hyps)


def spelling_posteriors(ctc_tokenizer: Tokenizer, texts) -> tuple:
    """CTC log-probabilities (B, T, V+1) whose best path spells each text (a blank between repeated pieces), then
    padding frames that favour another piece (they must be ignored), and the valid lengths."""
    blank = ctc_tokenizer.vocab_size
    paths = []
    for ids in ctc_tokenizer.encode_batch(texts):
        path = []
        for i, t in enumerate(ids):
            if i and ids[i - 1] == t:
                path.append(blank)
            path.append(t)
        paths.append(path)
    T = max(len(p) for p in paths) + 3
    log_probs = torch.full((len(texts), T, blank + 1), -10.0)
    for b, path in enumerate(paths):
        log_probs[b, torch.arange(len(path)), torch.tensor(path, dtype=torch.long)] = 0.0
        log_probs[b, len(path):, 5] = 0.0
    return log_probs, torch.tensor([len(p) for p in paths])


def test_drafts_are_decoded_and_retokenised(corpus):
    chars, words = Tokenizer(corpus["chars"]), Tokenizer(corpus["tokenizer"])
    texts = ["THE BIG CAT SITS", "GREEN GREEN DOG"]
    log_probs, lens = spelling_posteriors(chars, texts)
    assert ctc_drafts(log_probs, lens, chars.vocab_size) == chars.encode_batch(texts)
    assert ctc_drafts(log_probs, lens, chars.vocab_size, chars, words) == words.encode_batch(texts)


def test_dataset_adds_ctc_targets_and_skips_text_outside_the_ctc_vocabulary(corpus, tmp_path, caplog):
    words = Tokenizer(corpus["tokenizer"])
    no_g = train_bpe([w for w in WORDS if "G" not in w], tmp_path / "lang_no_g", 40, "char")
    chars = Tokenizer(no_g)
    cuts = read_cuts(corpus["valid"])
    with caplog.at_level(logging.WARNING, logger="mtp_asr"):
        batch = AsrDataset(words, ctc_tokenizer=chars)[cuts]
    kept = {c.id: c.supervisions[0].text for c in cuts if "G" not in c.supervisions[0].text}
    assert batch["cut_ids"] == list(kept)
    assert batch["ctc_tokens"] == [chars.encode(t) for t in kept.values()]
    assert batch["tokens"] == [words.encode(t) for t in kept.values()]
    dropped = [c.id for c in cuts if c.id not in kept]
    assert dropped, "the dev set should hold a word with G"
    for cut_id in dropped:
        assert f"skipping cut {cut_id}: its transcript holds text outside the CTC tokenizer's vocabulary" in caplog.text


def test_config_errors_name_the_option(corpus, tmp_path):
    with pytest.raises(ConfigError, match="ctc_vocab_size is 9 but no data.ctc_tokenizer"):
        resolve_speech_config(tiny_train_config(corpus, **{"model.encoder.ctc_vocab_size": 9}))
    with pytest.raises(ConfigError, match=r"ctc_vocab_size is 9 but the CTC tokenizer .* has \d+ pieces"):
        resolve_speech_config(tiny_train_config(corpus, **{"model.encoder.ctc_vocab_size": 9,
                                                           "data.ctc_tokenizer": str(corpus["chars"])}))
    with pytest.raises(ConfigError, match="the model has no CTC head"):
        resolve_speech_config(tiny_train_config(corpus, **{"model.encoder.ctc": False, "ctc_weight": 0.0,
                                                           "data.ctc_tokenizer": str(corpus["chars"])}))
    cfg, _ = resolve_speech_config(tiny_train_config(corpus, **{"data.ctc_tokenizer": str(corpus["chars"])}))
    assert cfg.model.encoder.ctc_vocab_size == Tokenizer(corpus["chars"]).vocab_size


def test_init_encoder_trained_on_other_labels_is_refused(corpus, trained, tmp_path):
    # The same characters in another order (a char model numbers its pieces by frequency): same size, other labels.
    chars = Tokenizer(corpus["chars"])
    other = Tokenizer(train_bpe([" ".join(WORDS), "W" * 500, "M" * 400] + corpus["sentences"], tmp_path / "other",
                                40, "char"))
    assert other.vocab_size == chars.vocab_size and other.to_bytes() != chars.to_bytes()
    cfg = tiny_train_config(corpus, **{"data.ctc_tokenizer": str(other.path),
                                       "init_encoder": str(trained / "ctc" / "epoch-40.pt")})
    with pytest.raises(ConfigError, match=r"init_encoder .*epoch-40.pt: its CTC head was trained with another "
                                          "tokenizer"):
        train_speech(cfg, tmp_path / "asr")
    # ...and the decoder's word tokenizer for a head trained on characters: a shape mismatch, also refused.
    cfg = tiny_train_config(corpus, init_encoder=str(trained / "ctc" / "epoch-40.pt"))
    with pytest.raises(Exception, match="different model config"):
        train_speech(cfg, tmp_path / "asr2")


def test_export_writes_the_ctc_tokenizer(corpus, trained, tmp_path):
    out = export_checkpoint(trained / "asr" / "epoch-20.pt", tmp_path / "export")
    assert (out / "ctc_tokenizer.model").read_bytes() == Tokenizer(corpus["chars"]).to_bytes()


def test_checkpoint_without_its_ctc_tokenizer_or_with_another_is_refused(trained, tmp_path):
    ckpt = load_checkpoint(trained / "asr" / "epoch-20.pt")
    del ckpt["ctc_tokenizer"]
    torch.save(ckpt, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"broken.pt has a CTC head of its own vocabulary .* no CTC tokenizer"):
        load_speech_model(tmp_path / "broken.pt")
    ckpt["ctc_tokenizer"] = ckpt["tokenizer"]  # the decoder's word pieces: another size
    torch.save(ckpt, tmp_path / "swapped.pt")
    with pytest.raises(CheckpointError, match=r"the CTC tokenizer in .*swapped.pt has \d+ pieces but its CTC head has"):
        load_speech_model(tmp_path / "swapped.pt")


def test_transcribe_with_ctc_verify_equals_greedy(trained, audio_writer, tmp_path):
    files = [tmp_path / f"a{i}.wav" for i in range(3)]
    for i, f in enumerate(files):
        audio_writer(f, 0.6 + 0.3 * i, seed=i)
    ckpt = trained / "asr" / "epoch-20.pt"
    greedy = transcribe_files(ckpt, 1, files, DecodeSettings("greedy"), device="cpu")
    verify = transcribe_files(ckpt, 1, files, DecodeSettings("ctc-verify"), device="cpu")
    assert verify == greedy and len(verify) == 3
    # ctc spells its best path with the CTC head's characters, whatever words they make.
    model, _, _ = load_speech_model(ckpt)
    extractor = fbank_extractor()
    spelled = []
    for f in files:
        feats = torch.from_numpy(extractor.extract(load_audio(f), 16000)).float()[None]
        with torch.no_grad():
            frames, lens = model.encoder(feats, torch.tensor([feats.shape[1]]))
            (ids,) = ctc_drafts(model.encoder.ctc_log_probs(frames), lens, model.encoder.blank_id)
        spelled.append((str(f), model.ctc_tokenizer.decode(ids)))
    assert transcribe_files(ckpt, 1, files, DecodeSettings("ctc", ctc_beam_size=1), device="cpu") == spelled
