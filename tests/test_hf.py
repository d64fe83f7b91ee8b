"""Hugging Face LLaMA checkpoints in and out: our decoder's logits must equal transformers' on the same weights."""
import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mtp_asr.model.heads import HeadsConfig, MTPHeads  # noqa: E402
from mtp_asr.model.hf import (  # noqa: E402
    hf_tokenizer_path,
    load_hf_decoder,
    load_hf_state_dict,
    read_hf_config,
    save_hf_decoder,
)
from mtp_asr.model.llama import LlamaConfig, LlamaDecoder  # noqa: E402
from mtp_asr.model.lm import MTPLanguageModel  # noqa: E402

VOCAB = 96
SEQ = 24


def hf_model(dtype=torch.float32, seed: int = 0, **overrides):
    """A random tiny LlamaForCausalLM whose weights (norms included) are far from their initial values."""
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160,
                  max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs, attn_implementation="eager"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model.to(dtype).eval()


def save_hf(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def ids(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def our_logits(decoder: LlamaDecoder, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return decoder.lm_head(decoder.norm(decoder(decoder.embed_tokens(tokens))))


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


CASES = {
    "mha_untied": {},
    "gqa": dict(num_key_value_heads=2),
    "mqa_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "tied": dict(tie_word_embeddings=True),
    "rope_theta": dict(rope_theta=500.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    model = hf_model(torch.float64, **CASES[case])
    decoder = load_hf_decoder(save_hf(model, tmp_path / case))
    assert decoder.embed_tokens.weight.dtype == torch.float64
    tokens = ids()
    ref = hf_logits(model, tokens)
    assert ref.abs().max() > 1.0  # the weights are big enough for a wrong layout to show
    # transformers computes its rotary angles in float32 even for a float64 model: differences of ~2e-6 remain.
    torch.testing.assert_close(our_logits(decoder, tokens), ref, atol=1e-5, rtol=0)
    if model.config.tie_word_embeddings:
        assert decoder.lm_head.weight is decoder.embed_tokens.weight


def test_config_fields(tmp_path):
    model = hf_model(num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
    cfg = read_hf_config(save_hf(model, tmp_path / "m"))
    assert cfg == LlamaConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160,
                              norm_eps=1e-6, rope_theta=500.0, max_seq_len=128, tie_embeddings=True)


def test_rope_theta_matters(tmp_path):
    """Guards test (d): with the default theta instead of the stored one, the logits would differ clearly."""
    model = hf_model(rope_theta=500.0)
    decoder = load_hf_decoder(save_hf(model, tmp_path / "m"))
    wrong = LlamaDecoder(LlamaConfig(**{**decoder.cfg.__dict__, "rope_theta": 10000.0}))
    wrong.load_state_dict(decoder.state_dict())
    tokens = ids()
    assert (our_logits(wrong, tokens) - hf_logits(model, tokens)).abs().max() > 1e-2


def test_sharded_checkpoint(tmp_path):
    model = hf_model()
    path = save_hf(model, tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (path / "model.safetensors.index.json").is_file()
    decoder = load_hf_decoder(path)
    tokens = ids()
    torch.testing.assert_close(our_logits(decoder, tokens), hf_logits(model, tokens), atol=1e-5, rtol=1e-5)


def test_dtype_cast_on_load(tmp_path):
    path = save_hf(hf_model(torch.float32), tmp_path / "m")
    decoder = load_hf_decoder(path, dtype=torch.bfloat16)
    assert {p.dtype for p in decoder.parameters()} == {torch.bfloat16}
    state = load_hf_state_dict(path)
    assert "model.norm.weight" not in state and state["norm.weight"].dtype == torch.float32


def test_kv_cache_decoding_matches_full_forward(tmp_path):
    model = hf_model(num_key_value_heads=2)
    decoder = load_hf_decoder(save_hf(model, tmp_path / "m"))
    tokens = ids(batch=2)
    ref = hf_logits(model, tokens)
    cache = decoder.new_cache(batch=2, max_len=SEQ)
    steps = []
    with torch.no_grad():
        prefill = 5  # a multi-token first call, then one token per call
        for start, end in [(0, prefill)] + [(t, t + 1) for t in range(prefill, SEQ)]:
            geometry = cache.call_geometry(end - start)
            hidden = decoder(decoder.embed_tokens(tokens[:, start:end]), cache, geometry)
            steps.append(decoder.lm_head(decoder.norm(hidden)))
            cache.lengths += end - start
    torch.testing.assert_close(torch.cat(steps, dim=1), ref, atol=1e-5, rtol=1e-5)


def test_trunk_of_mtp_language_model(tmp_path):
    model = hf_model(num_key_value_heads=2)
    decoder = load_hf_decoder(save_hf(model, tmp_path / "m"))
    heads = HeadsConfig(num_heads=3, kind="linear")
    lm = MTPLanguageModel(decoder.cfg, heads)
    lm.decoder.load_state_dict(decoder.state_dict(), strict=True)
    # Heads initialised from the trunk (linear: copies of lm_head) must be rebuilt once the trunk is loaded.
    lm.heads = MTPHeads(heads, lm.decoder)
    tokens = ids()
    with torch.no_grad():
        states = lm.heads.states(lm.decoder, lm.decoder(lm.embed(tokens)))
        head_logits = [lm.heads.logits(lm.decoder, k, s) for k, s in enumerate(states)]
    ref = hf_logits(model, tokens)
    for logits in head_logits:  # every linear head starts as the LM head
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(lm([[5, 6, 7], [8]]).loss)


@pytest.mark.parametrize("tied, shard_bytes", [(False, None), (True, None), (False, 30_000)])
def test_round_trip_through_transformers(tmp_path, tied, shard_bytes):
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, rope_theta=2000.0,
                      norm_eps=1e-6, max_seq_len=64, tie_embeddings=tied)
    ours = LlamaDecoder(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    out = save_hf_decoder(ours, tmp_path / "export", max_shard_bytes=shard_bytes, bos_id=1, eos_id=2)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is tied and config["bos_token_id"] == 1
    if shard_bytes:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2 and not (out / "model.safetensors").exists()
        for shard in set(index["weight_map"].values()):
            # one tensor may exceed the limit alone (the 96x64 embedding is 24.6 kB, under it)
            assert (out / shard).stat().st_size < shard_bytes + 4096

    model = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    rope = getattr(model.config, "rope_parameters", None) or {"rope_theta": model.config.rope_theta}  # 5.x or 4.x
    assert rope["rope_theta"] == 2000.0
    assert model.config.tie_word_embeddings is tied
    tokens = ids()
    torch.testing.assert_close(hf_logits(model, tokens), our_logits(ours, tokens), atol=1e-5, rtol=1e-5)

    again = load_hf_decoder(out)
    assert again.cfg == cfg
    for name, t in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name


def test_export_replaces_previous_export_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    ours = LlamaDecoder(LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2))
    out = save_hf_decoder(ours, tmp_path / "export", max_shard_bytes=20_000)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}  # as readable as other outputs

    import mtp_asr.model.hf as hf
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) >= 2:  # the second shard of the first try, and every later call
            raise OSError("disk full")
        return real_save(tensors, path, metadata=metadata)

    real_save = hf.save_file
    monkeypatch.setattr(hf, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_hf_decoder(LlamaDecoder(ours.cfg), out, max_shard_bytes=20_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export is untouched
    assert sorted(os.listdir(tmp_path)) == ["export"]  # and no temporary directory is left behind
    with pytest.raises(OSError):
        save_hf_decoder(ours, tmp_path / "fresh")
    assert sorted(os.listdir(tmp_path)) == ["export"]

    monkeypatch.undo()
    save_hf_decoder(ours, out)  # a single-file export replaces the sharded one as a whole
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["export"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="notes.*not a model export"):
        save_hf_decoder(ours, tmp_path / "notes")


def edit_config(path: Path, **changes) -> Path:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("changes, key", [
    (dict(model_type="mistral"), "model_type"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(head_dim=32), "head_dim"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "rope_parameters"),
    (dict(rope_parameters=None, rope_theta=5e5, rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
    (dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
])
def test_refuses_what_we_do_not_implement(tmp_path, changes, key):
    path = edit_config(save_hf(hf_model(), tmp_path / "m"), **changes)
    with pytest.raises(ValueError, match=rf"m/config\.json: {key}"):
        load_hf_decoder(path)


def test_reads_transformers_4_config_layout(tmp_path):
    path = save_hf(hf_model(), tmp_path / "m")
    edit_config(path, rope_parameters=None, rope_theta=321.0, rope_scaling=None)
    assert read_hf_config(path).rope_theta == 321.0


def test_weight_errors_name_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_hf(hf_model(), tmp_path / "m")
    edit_config(path, intermediate_size=128)
    shape_error = r"model\.safetensors: tensor model\.layers\.\d\.mlp\.\w+_proj\.weight has shape"
    with pytest.raises(ValueError, match=shape_error):
        load_hf_decoder(path)
    edit_config(path, intermediate_size=160)

    tensors = load_file(path / "model.safetensors")
    save_file({**tensors, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, path / "model.safetensors")
    unexpected = r"model\.safetensors: unexpected tensor model\.layers\.0\.self_attn\.q_proj\.bias"
    with pytest.raises(ValueError, match=unexpected):
        load_hf_decoder(path)
    del tensors["lm_head.weight"]  # untied, so the un-embedding must be there
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: missing tensor\(s\) lm_head\.weight"):
        load_hf_decoder(path)

    sharded = save_hf(hf_model(), tmp_path / "sharded", max_shard_size="40KB")
    last = sorted(sharded.glob("model-*.safetensors"))[-1]
    last.unlink()
    with pytest.raises(FileNotFoundError, match=rf"index\.json lists shard {last.name}, which is missing"):
        load_hf_decoder(sharded)
    for shard in sharded.glob("model-*.safetensors"):
        shard.unlink()
    (sharded / "model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        load_hf_decoder(sharded)


def test_tokenizer_found_and_copied(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = tmp_path / "text.txt"
    text.write_text("\n".join([
        "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
        "A SPEECH RECOGNISER TURNS AUDIO INTO WORDS",
        "MULTI TOKEN PREDICTION MAKES DECODING FASTER",
        "LLAMA MODELS USE ROTARY POSITIONS",
    ] * 5) + "\n")
    prefix = tmp_path / "spm"
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(prefix), vocab_size=40, model_type="unigram",
                                   hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    model_dir = save_hf(hf_model(), tmp_path / "m")
    assert hf_tokenizer_path(model_dir) is None
    (model_dir / "tokenizer.model").write_bytes(Path(f"{prefix}.model").read_bytes())
    found = hf_tokenizer_path(model_dir)
    assert found == model_dir / "tokenizer.model"

    out = save_hf_decoder(load_hf_decoder(model_dir), tmp_path / "export", tokenizer_model=found)
    assert hf_tokenizer_path(out).read_bytes() == found.read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(hf_tokenizer_path(out)))
    assert sp.decode(sp.encode("THE LAZY FOX")) == "THE LAZY FOX"
    with pytest.raises(FileNotFoundError, match="missing.model"):
        save_hf_decoder(load_hf_decoder(model_dir), tmp_path / "export2", tokenizer_model=tmp_path / "missing.model")
