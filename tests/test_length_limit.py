"""The decoding length limit (`--max-tokens-per-second`): outputs stop at 10 + rate x seconds without EOS, and the
summary counts the utterances it ended, so a limit that cuts real transcripts short shows in every result."""
import json

import pytest
from click.testing import CliRunner
from lhotse import load_manifest

from mtp_asr.cli import main
from mtp_asr.decode.runner import DecodeSettings, decode_cuts, length_limits
from mtp_asr.model.build import load_speech_model


@pytest.mark.parametrize("method", ["greedy", "mtp-verify", "beam"])
def test_outputs_stop_at_the_limit_and_are_counted(small_corpus, small_checkpoint, method):
    model, tokenizer, _ = load_speech_model(small_checkpoint)
    cuts = load_manifest(small_corpus["valid"])
    seconds = {c.id: c.duration for c in cuts}
    counts = []
    for rate in (0.5, 4.0):
        res = decode_cuts(model, tokenizer, cuts, DecodeSettings(method, max_tokens_per_second=rate), 2)
        limits = dict(zip(seconds, length_limits(model, [c.num_frames for c in cuts], list(seconds.values()), rate)))
        for cut_id, tokens in res.tokens.items():
            assert len(tokens) <= limits[cut_id]
            if not res.finished[cut_id]:
                assert len(tokens) == limits[cut_id], cut_id
        summary = res.summary()
        assert summary["max_tokens_per_second"] == rate
        assert summary["num_length_limited"] == sum(not f for f in res.finished.values())
        counts.append(summary["num_length_limited"])
    # The untrained model rarely says EOS: the tight limit ends most outputs (and the looser one no more of them).
    assert counts[0] >= len(cuts) // 2 and counts[1] <= counts[0]


def test_max_tokens_per_second_option(small_corpus, small_checkpoint, tmp_path):
    decode = ["decode", "--checkpoint", str(small_checkpoint), "--cuts", str(small_corpus["valid"])]
    bad = CliRunner().invoke(main, decode + ["--max-tokens-per-second", "0", "--out-dir", str(tmp_path)])
    assert bad.exit_code != 0 and "--max-tokens-per-second" in bad.output
    with pytest.raises(ValueError, match="--max-tokens-per-second"):
        DecodeSettings("greedy", max_tokens_per_second=0)
    out = tmp_path / "decode"
    result = CliRunner().invoke(main, decode + ["--max-tokens-per-second", "0.5", "--out-dir", str(out),
                                                "--device", "cpu"])
    assert result.exit_code == 0, result.output
    (path,) = out.glob("summary-*.json")
    summary = json.loads(path.read_text())
    assert summary["max_tokens_per_second"] == 0.5 and summary["num_length_limited"] >= 1
    assert "ended at the length limit" in result.output


def test_transcribe_takes_the_limit(small_checkpoint, audio_writer, tmp_path):
    """`transcribe --max-tokens-per-second`: the untrained model, which rarely says EOS, transcribes 2 s of audio into
    11 tokens with 0.5 per second and into more with 5."""
    audio = tmp_path / "a.wav"
    audio_writer(audio, 2.0)
    lengths = []
    for rate in ("0.5", "5"):
        result = CliRunner().invoke(main, ["transcribe", "--checkpoint", str(small_checkpoint), "--device", "cpu",
                                           "--max-tokens-per-second", rate, str(audio)])
        assert result.exit_code == 0, result.output
        name, text = result.output.strip().splitlines()[-1].split("\t")
        lengths.append(len(text))
    assert 0 < lengths[0] < lengths[1]
