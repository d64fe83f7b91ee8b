"""The decoder loop's CPU threads (`--decoder-threads`): set for the search only, restored after it, recorded."""
import json

import pytest
import torch
from click.testing import CliRunner
from lhotse import load_manifest

import mtp_asr.decode.runner as runner
from mtp_asr.cli import main
from mtp_asr.decode.runner import DecodeSettings, decode_cuts
from mtp_asr.model.build import load_speech_model


@pytest.mark.parametrize("method", ["greedy", "mtp-verify", "beam"])
def test_search_runs_on_the_decoder_threads_and_restores_the_count(small_corpus, small_checkpoint, monkeypatch,
                                                                    method):
    seen = []
    for name in ("generate", "beam_search"):
        real = getattr(runner, name)
        monkeypatch.setattr(runner, name, lambda *a, _real=real, **k: (seen.append(torch.get_num_threads()),
                                                                        _real(*a, **k))[1])
    model, tokenizer, _ = load_speech_model(small_checkpoint)
    cuts = load_manifest(small_corpus["valid"])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        one = decode_cuts(model, tokenizer, cuts, DecodeSettings(method, decoder_threads=1), 2)
        assert set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        decode_cuts(model, tokenizer, cuts, DecodeSettings(method, decoder_threads=0), 2)  # 0: torch's setting
        assert set(seen) == {2} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert one.summary()["decoder_threads"] == 1


def test_decoder_threads_option(small_corpus, small_checkpoint, tmp_path):
    decode = ["decode", "--checkpoint", str(small_checkpoint), "--cuts", str(small_corpus["valid"])]
    bad = CliRunner().invoke(main, decode + ["--decoder-threads", "-1", "--out-dir", str(tmp_path)])
    assert bad.exit_code != 0 and "--decoder-threads" in bad.output
    with pytest.raises(ValueError, match="--decoder-threads"):
        DecodeSettings("greedy", decoder_threads=-1)
    out = tmp_path / "decode"
    result = CliRunner().invoke(main, decode + ["--decoder-threads", "2", "--out-dir", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    (summary,) = out.glob("summary-*.json")
    assert json.loads(summary.read_text())["decoder_threads"] == 2
