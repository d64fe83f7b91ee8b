"""MWER: the loss and its gradient by hand, re-scoring under the search's factorisation, and training that lowers
the expected WER on a small fixed set."""
import math
import sys
from pathlib import Path

import pytest
import torch

from mtp_asr.decode.beam import beam_search
from mtp_asr.decode.verify_beam import verify_beam_search
from mtp_asr.model.speech_llama import fits_decoder
from mtp_asr.train.mwer import _searchable, mwer_loss, word_errors

sys.path.insert(0, str(Path(__file__).parent))
from model_fixtures import random_prompts, tiny_lm, tiny_speech_llama  # noqa: E402
from train_fixtures import make_corpus, tiny_train_config  # noqa: E402


def test_mwer_loss_and_gradient_match_a_hand_computation():
    scores = torch.tensor([-1.0, -2.0, -4.0], dtype=torch.float64, requires_grad=True)
    errors = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    loss = mwer_loss(scores, errors)
    loss.backward()
    z = math.exp(-1) + math.exp(-2) + math.exp(-4)
    p = [math.exp(-1) / z, math.exp(-2) / z, math.exp(-4) / z]
    mean = (0 + 1 + 3) / 3
    relative = [e - mean for e in (0.0, 1.0, 3.0)]
    hand_loss = sum(pi * ri for pi, ri in zip(p, relative))
    # d/ds_n sum_m p_m r_m = p_n (r_n - sum_m p_m r_m)
    hand_grad = [pi * (ri - hand_loss) for pi, ri in zip(p, relative)]
    assert loss.item() == pytest.approx(hand_loss, abs=1e-12)
    assert scores.grad.tolist() == pytest.approx(hand_grad, abs=1e-12)


def test_word_errors_use_the_normaliser():
    assert word_errors("The cat, sat!", "THE CAT SAT") == 0
    assert word_errors("the cat sat", "the hat") == 2


def test_rescoring_reproduces_mtp_beam_verify_scores():
    """mtp-beam-verify's N-best tokens are all head 1's: MWER's re-scoring reproduces them the same way."""
    lm = tiny_lm(kind="hydra", num_heads=3, vocab=16)
    prefix, lens = random_prompts(lm, 5, 6, torch.Generator().manual_seed(1))
    out = verify_beam_search(lm, prefix, lens, max_new_tokens=12, beam_size=3, nbest=3)
    hyps = [h for per_utt in out.nbest for h in per_utt]
    owner = torch.tensor([i for i, per_utt in enumerate(out.nbest) for _ in per_utt])
    with torch.enable_grad():
        rescored = lm.score_sequences(prefix[owner], lens[owner], [h.tokens for h in hyps], [h.heads for h in hyps],
                                      [h.positions for h in hyps])
    for h, r in zip(hyps, rescored):
        assert r.tolist() == pytest.approx(h.token_scores, abs=1e-9)


@pytest.mark.parametrize("kind", ["latent", "layer"])
@pytest.mark.parametrize("rate", [0.0, 1.7], ids=["consecutive", "aligned"])
def test_rescoring_reproduces_the_search_scores(kind, rate):
    """The log-probabilities recomputed with gradient in one teacher-forced pass equal those the search reported."""
    lm = tiny_lm(kind=kind, num_heads=3, vocab=16, prefix_rate=rate)
    prefix, lens = random_prompts(lm, 5, 6, torch.Generator().manual_seed(0))
    out = beam_search(lm, prefix, lens, "mtp-beam", threshold=0.2, max_new_tokens=12, beam_size=3, nbest=3)
    hyps = [h for per_utt in out.nbest for h in per_utt]
    owner = torch.tensor([i for i, per_utt in enumerate(out.nbest) for _ in per_utt])
    assert any(k > 1 for h in hyps for k in h.heads), "some tokens should come from heads 2..K"
    with torch.enable_grad():
        rescored = lm.score_sequences(prefix[owner], lens[owner], [h.tokens for h in hyps], [h.heads for h in hyps],
                                      [h.positions for h in hyps])
    for h, r in zip(hyps, rescored):
        assert r.tolist() == pytest.approx(h.token_scores, abs=1e-9)


@pytest.mark.slow
def test_mwer_steps_lower_the_expected_wer(tmp_path):
    """Briefly trained with cross-entropy, then MWER on the same small fixed set: its expected WER goes down."""
    from mtp_asr.train.checkpoint import load_checkpoint
    from mtp_asr.train.run import train_mwer, train_speech

    corpus = make_corpus(tmp_path / "corpus", n_train=16, n_valid=16)
    cfg = tiny_train_config(corpus, num_epochs=3)
    cfg["data"]["valid_cuts"] = cfg["data"]["train_cuts"]
    assert train_speech(cfg, tmp_path / "ce") == 0
    mwer_cfg = {"data": cfg["data"], "optim": {"lr": 2e-3, "warmup_steps": 1, "schedule": "constant"},
                "nbest": 4, "beam_size": 4, "threshold": 0.6, "ce_weight": 0.0, "num_epochs": 6, "log_interval": 1,
                "seed": 3, "spec_augment": {"enabled": False}}
    assert train_mwer(mwer_cfg, tmp_path / "mwer", tmp_path / "ce" / "epoch-3.pt") == 0
    log = (tmp_path / "mwer" / "log" / "log-mwer-rank0.txt").read_text()
    expected = [float(line.split("expected wer ")[1].split(",")[0]) for line in log.splitlines()
                if "validation after epoch" in line]
    assert len(expected) == 6
    assert min(expected[-2:]) < expected[0], expected
    assert load_checkpoint(tmp_path / "mwer" / "epoch-6.pt")["kind"] == "speech_llama"

    # N-best lists of mtp-beam-verify (head 1's scores) train as well.
    verify_cfg = {**mwer_cfg, "num_epochs": 1, "search": "mtp-beam-verify"}
    assert train_mwer(verify_cfg, tmp_path / "mwer-verify", tmp_path / "ce" / "epoch-3.pt") == 0
    assert "expected wer" in (tmp_path / "mwer-verify" / "log" / "log-mwer-rank0.txt").read_text()

    # The lattice source: paths sampled from everything the search explored.
    lattice_cfg = {**mwer_cfg, "num_epochs": 1, "mwer_source": "lattice", "lattice_backend": "builtin"}
    assert train_mwer(lattice_cfg, tmp_path / "mwer-lattice", tmp_path / "ce" / "epoch-3.pt") == 0
    assert "expected wer" in (tmp_path / "mwer-lattice" / "log" / "log-mwer-rank0.txt").read_text()


def test_lattice_paths_are_rescored_like_the_search_scored_them():
    """mwer_source=lattice: paths sampled from the search's lattice carry heads/positions that re-score to their
    lattice scores, and the search's N-best hypotheses are complete paths of that lattice."""
    from mtp_asr.decode.lattice import mwer_paths

    lm = tiny_lm(kind="latent", num_heads=3, vocab=16)
    prefix, lens = random_prompts(lm, 4, 6, torch.Generator().manual_seed(4))
    out = beam_search(lm, prefix, lens, "mtp-beam", threshold=0.3, max_new_tokens=10, beam_size=3, lattice=True)
    for lattice, nbest in zip(out.lattices, out.nbest):
        complete = {(p.tokens, p.heads): p.score for p in lattice.complete_paths()}
        for h in nbest:
            if h.finished:
                assert complete[(tuple(h.tokens), tuple(h.heads))] == pytest.approx(h.score, rel=1e-5)
    paths = mwer_paths(out.lattices, "lattice", num_paths=6, scale=0.5, seed=1)
    owner = torch.tensor([i for i, ps in enumerate(paths) for _ in ps])
    flat = [p for ps in paths for p in ps]
    assert flat and all(len(set((p.tokens, p.heads) for p in ps)) == len(ps) for ps in paths)
    rescored = lm.score_sequences(prefix[owner], lens[owner], [p.tokens for p in flat], [p.heads for p in flat],
                                  [p.positions for p in flat])
    for p, r in zip(flat, rescored):
        assert float(r.detach().sum()) == pytest.approx(p.score, rel=1e-5)


def test_ce_head_weights_keep_heads_off_the_references(tmp_path):
    """With a 1-best list the MWER term has no gradient, so only the cross-entropy trains: with ce_head_weights
    [1, 0] head 2 stays exactly as it was (no weight decay here), with the model's own weights it moves. A list of
    the wrong length is refused before training."""
    from mtp_asr.config import ConfigError
    from mtp_asr.train.checkpoint import load_checkpoint
    from mtp_asr.train.run import train_mwer, train_speech

    corpus = make_corpus(tmp_path / "corpus", n_train=8, n_valid=4)
    cfg = tiny_train_config(corpus, num_epochs=1)
    assert train_speech(cfg, tmp_path / "ce") == 0
    init = tmp_path / "ce" / "epoch-1.pt"
    base = {"data": cfg["data"], "optim": {"lr": 1e-2, "warmup_steps": 1, "schedule": "constant", "weight_decay": 0.0},
            "nbest": 1, "beam_size": 1, "threshold": 0.6, "ce_weight": 1.0, "num_epochs": 1, "seed": 3,
            "spec_augment": {"enabled": False}}

    def head2_and_trunk(path):
        model = load_checkpoint(path)["model"]
        return model["lm.heads.latent.0"], model["lm.decoder.layers.0.mlp.up_proj.weight"]

    head2, trunk = head2_and_trunk(init)
    assert train_mwer({**base, "ce_head_weights": [1.0, 0.0]}, tmp_path / "head1", init) == 0
    kept, trained = head2_and_trunk(tmp_path / "head1" / "epoch-1.pt")
    assert torch.equal(kept, head2) and not torch.equal(trained, trunk)
    assert train_mwer(base, tmp_path / "all", init) == 0
    assert not torch.equal(head2_and_trunk(tmp_path / "all" / "epoch-1.pt")[0], head2)

    with pytest.raises(ConfigError, match="ce_head_weights has 3 values for a model with 2 heads"):
        train_mwer({**base, "ce_head_weights": [1.0, 0.0, 0.0]}, tmp_path / "wrong", init)
    assert not (tmp_path / "wrong" / "epoch-1.pt").exists()


def test_mwer_trains_only_on_cuts_its_search_can_decode():
    """A cut whose prompt leaves the decoder room for its transcript but not for the search's drafts is left out:
    beam search would refuse a limit below one token and stop the run."""
    model = tiny_speech_llama(num_heads=3, feat_dim=80)
    frames = [n for n in range(40, 20000, 4) if fits_decoder(n, 1, model.cfg) and model.max_new_tokens(n) < 1]
    assert frames, "no prompt length between the two limits"
    assert not _searchable(frames[0], 1, model)
    assert _searchable(40, 1, model)
