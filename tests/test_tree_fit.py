"""`mtp-asr draft-tree`: rank-path counts of the heads on the model's own greedy transcripts, the best tree of N nodes,
and decoding with the shape it prints (same output as greedy)."""
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from lhotse import load_manifest

from mtp_asr.cli import main
from mtp_asr.decode.runner import DecodeSettings, decode_cuts
from mtp_asr.decode.tree_fit import rank_counts, tokens_per_call
from mtp_asr.decode.tree_spec import parse_tree, product_paths
from mtp_asr.model.build import load_speech_model
from mtp_asr.model.lm import IGNORE
from mtp_asr.train.distill import agreement, cache_trunk

sys.path.insert(0, str(Path(__file__).parent))
from model_fixtures import randomize_, speech_checkpoint, tiny_speech_llama  # noqa: E402
from train_fixtures import make_corpus  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), n_train=8, n_valid=8)


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory):
    return speech_checkpoint(tmp_path_factory.mktemp("model") / "model.pt", corpus["tokenizer"], seed=3)


def test_rank_counts_agree_with_head_agreement_and_direct_ranks(corpus):
    torch.manual_seed(0)
    model = tiny_speech_llama(num_heads=3, vocab=24, feat_dim=80).eval()
    with torch.no_grad():
        randomize_(model.lm, seed=1)
    cuts = load_manifest(corpus["valid"])
    labels = {c.id: (torch.randint(3, 24, (int(torch.randint(2, 9, ())),)).tolist(), True) for c in cuts}
    batches = cache_trunk(model, cuts, labels, batch_size=3)
    lm = model.lm
    counts, roots = rank_counts(lm, batches, max_rank=24)
    assert roots == sum(len(t) + 1 for t, _ in labels.values())  # every transcript token and EOS has a root
    # Rank-0 paths of depth 1 are the positions where head 2's argmax is the greedy token: distill's agreement.
    head2_labelled = sum(int((b.labels[1] != IGNORE).sum()) for b in batches)
    assert counts[(0,)] == pytest.approx(agreement(lm, batches)[0] * head2_labelled)
    # Every path, against ranks read off a descending sort of each head's logits.
    direct = {}
    with torch.no_grad():
        for b in batches:
            states = lm.heads.states(lm.decoder, b.hidden, positions=b.positions)
            for row, col in (b.labels[0] != IGNORE).nonzero().tolist():
                path = []
                for k in (1, 2):
                    target = int(b.labels[k][row, col])
                    if target == IGNORE:
                        break
                    order = lm.heads.logits(lm.decoder, k, states[k][row, col]).argsort(descending=True).tolist()
                    path.append(order.index(target))
                    direct[tuple(path)] = direct.get(tuple(path), 0) + 1
    assert dict(counts) == direct
    chain = product_paths((1, 1))
    assert tokens_per_call(counts, roots, chain) == 1 + (counts[(0,)] + counts[(0, 0)]) / roots
    assert tokens_per_call(counts, roots, tuple(counts)) > tokens_per_call(counts, roots, chain)


def test_draft_tree_command_prints_a_shape_that_decodes_like_greedy(corpus, checkpoint, tmp_path):
    result = CliRunner().invoke(main, ["draft-tree", "--checkpoint", str(checkpoint), "--cuts", str(corpus["valid"]),
                                       "--nodes", "5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    spec = result.stdout.strip().splitlines()[-1]
    paths = parse_tree(spec)
    assert len(paths) == 5 and max(len(p) for p in paths) <= 2 and ";" in spec
    model, tokenizer, _ = load_speech_model(checkpoint)
    cuts = load_manifest(corpus["train"])
    greedy = decode_cuts(model, tokenizer, cuts, DecodeSettings("greedy"), 4)
    tree = decode_cuts(model, tokenizer, cuts, DecodeSettings("mtp-verify", draft_tree=spec), 4)
    assert tree.tokens == greedy.tokens
    out = tmp_path / "decode"
    result = CliRunner().invoke(main, ["decode", "--checkpoint", str(checkpoint), "--cuts", str(corpus["valid"]),
                                       "--method", "mtp-verify", "--draft-tree", spec, "--out-dir", str(out),
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    (summary,) = out.glob("summary-*tree5nodes*.json")
    assert '"draft_tree": "' + spec in summary.read_text()


def test_draft_tree_errors(corpus, checkpoint, tmp_path):
    bad = CliRunner().invoke(main, ["decode", "--checkpoint", str(checkpoint), "--cuts", str(corpus["valid"]),
                                    "--method", "mtp-verify", "--draft-tree", "0;1.0", "--out-dir", str(tmp_path)])
    assert bad.exit_code != 0 and "--draft-tree" in bad.output and "lacks its parent 1" in bad.output
    one_head = speech_checkpoint(tmp_path / "one-head.pt", corpus["tokenizer"], num_heads=1)
    result = CliRunner().invoke(main, ["draft-tree", "--checkpoint", str(one_head), "--cuts", str(corpus["valid"]),
                                       "--device", "cpu"])
    assert result.exit_code != 0 and "one head" in result.output and str(one_head) in result.output
