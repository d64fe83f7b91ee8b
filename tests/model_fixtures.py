"""Tiny models and a cache-free reference decoder shared by tests/test_model.py and tests/test_generate.py."""
import math
from pathlib import Path
from typing import Optional

import pytest
import torch
from torch import Tensor, nn

from mtp_asr.decode.generate import tree_paths
from mtp_asr.model.adapter import AdapterConfig
from mtp_asr.model.encoder import EncoderConfig
from mtp_asr.model.heads import HeadsConfig
from mtp_asr.model.llama import LlamaConfig
from mtp_asr.model.lm import MTPLanguageModel
from mtp_asr.model.speech_llama import ModelConfig, SpeechLlama

BOS, EOS = 1, 2


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models on one thread: a second thread only adds synchronisation, and on a busy 2-core machine an
    oversubscribed thread pool makes each small op tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_lm(kind: str = "latent", num_heads: int = 3, vocab: int = 16, dim: int = 16, n_layers: int = 2,
            n_heads: int = 2, n_kv_heads: Optional[int] = 1, seed: int = 0, dtype=torch.float64,
            randomize: bool = True, prefix_rate: float = 0.0) -> MTPLanguageModel:
    """A decoder LM small enough for hundreds of decodes per second. Grouped-query attention by default, so the
    cache code runs with fewer key/value heads than query heads. randomize: see `randomize_`. prefix_rate > 0:
    aligned rotary positions for the prompt (see `mtp_asr.model.llama.rotary_positions`)."""
    torch.manual_seed(seed)
    lm = MTPLanguageModel(
        LlamaConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                    ffn_dim=2 * dim, max_seq_len=256),
        HeadsConfig(num_heads=num_heads, kind=kind), BOS, EOS, prefix_rate,
    ).to(dtype).eval()
    if randomize:
        randomize_(lm, seed)
    return lm


@torch.no_grad()
def randomize_(lm: MTPLanguageModel, seed: int) -> None:
    """Re-draw every weight at unit-variance scale: the default init (std 0.02) gives almost flat distributions and
    heads 2..K that start equal to head 1, so drafts, EOS and confident tokens would all be rare or trivial."""
    g = torch.Generator().manual_seed(seed + 1000)
    for name, p in lm.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        if name.endswith("norm.weight") or ".norms." in name:
            p.copy_(1 + 0.1 * noise)
        elif p.dim() == 1:  # medusa biases
            p.copy_(0.1 * noise)
        elif "embed_tokens" in name:
            p.copy_(noise)
        else:
            fan_in = p.shape[-1]
            scale = 2.0 if name.endswith("lm_head.weight") or ".proj." in name else 1.0
            p.copy_(scale * noise / math.sqrt(fan_in))


def tiny_speech_llama(kind: str = "latent", num_heads: int = 3, vocab: int = 24, feat_dim: int = 20,
                      ctc: bool = True, seed: int = 0, subsampling: int = 4,
                      audio_position_rate: float = 0.0) -> SpeechLlama:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        encoder=EncoderConfig(feat_dim=feat_dim, dim=16, num_layers=2, num_heads=2, ffn_dim=32, conv_kernel=5,
                              subsampling_channels=4, dropout=0.0, ctc=ctc, subsampling=subsampling),
        adapter=AdapterConfig(stack=2),
        decoder=LlamaConfig(vocab_size=vocab, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32,
                            max_seq_len=256),
        heads=HeadsConfig(num_heads=num_heads, kind=kind),
        bos_id=BOS, eos_id=EOS, audio_position_rate=audio_position_rate,
    )
    return SpeechLlama(cfg)


def random_prompts(lm: MTPLanguageModel, batch: int, max_len: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Right-padded random prompt embeddings (B, P, dim) of random lengths 1..max_len; the padding is random too,
    so any use of it shows up as a difference."""
    lens = torch.randint(1, max_len + 1, (batch,), generator=gen)
    p = lm.decoder.embed_tokens.weight
    prefix = torch.randn(batch, int(lens.max()), p.shape[1], generator=gen, dtype=torch.float64).to(p.dtype)
    return prefix, lens


@torch.no_grad()
def reference_decode(lm: MTPLanguageModel, prompt: Tensor, method: str, num_heads: int, threshold: float,
                     limit: int, tree=()) -> tuple[list, int, bool]:
    """One utterance, decoded by the definitions in DESIGN.md with a full causal forward (no KV cache) per decoder
    call: tokens (without EOS), decoder calls, and whether EOS ended it. mtp-verify with `tree` (a draft tree: widths
    or rank paths) checks the path to every node as a separate chain and keeps the longest accepted one."""
    K = 1 if method == "greedy" else num_heads
    out, paths, calls = [], [[]], 0
    while True:
        calls += 1
        first = prompt.shape[0] + len(out) - 1  # the last position that is not a draft
        best = None
        for drafts in paths:
            seq = torch.cat([prompt, lm.embed(torch.tensor(out + drafts, dtype=torch.long)).to(prompt.dtype)])
            states = lm.trunk(seq[None], torch.tensor([prompt.shape[0]]), torch.zeros(1, len(seq), dtype=torch.long))
            head1 = lm.heads.logits(lm.decoder, 0, states[0][0, first:]).argmax(-1).tolist()
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == head1[accepted]:
                accepted += 1
            if best is None or accepted > best[0]:
                best = accepted, drafts, head1, seq
        accepted, drafts, head1, seq = best
        new = drafts[:accepted] + [head1[accepted]]
        last = first + accepted
        extra = extra_head_logits(lm, seq, prompt.shape[0], last, new[-1], K)
        paths = [[]]
        if method == "mtp-verify" and tree:
            paths = [draft_path(lm, seq, prompt.shape[0], last, new[-1], ranks) for ranks in tree_paths(tree, K)]
        elif method == "mtp-verify":
            paths = [[int(e.argmax()) for e in extra]]
        elif method == "mtp-threshold":
            for e in extra:
                tok = int(e.argmax())
                if torch.softmax(e.float(), -1)[tok] < threshold:
                    break
                new.append(tok)
        for tok in new:
            if tok == lm.eos_id:
                return out, calls, True
            out.append(tok)
            if len(out) >= limit:
                return out, calls, False


def _head_chain(lm: MTPLanguageModel, seq: Tensor, prompt_len: int, last: int, chosen: int, ranks) -> list:
    """(logits, token) of heads 2, 3, ... at position `last` of a cache-free pass over `seq` (T, dim), the token after
    it being `chosen`, head k taking its candidate of rank ranks[k-2]. Hydra heads are conditioned on the token
    before theirs, given here by teacher forcing as training gives it: head 1's label at `last` is `chosen`, at
    last + k - 1 head k's token, one pass per head."""
    seq = torch.cat([seq, seq.new_zeros(len(ranks) + 1, seq.shape[1])])  # room for labels past the end (causal)
    labels = torch.zeros(1, len(seq), dtype=torch.long)
    labels[0, last] = chosen
    out = []
    for k, rank in enumerate(ranks, 1):
        states = lm.trunk(seq[None], torch.tensor([prompt_len]), labels)
        logits = lm.heads.logits(lm.decoder, k, states[k][0, last])
        token = int(logits.topk(rank + 1).indices[rank]) if rank else int(logits.argmax())
        labels[0, last + k] = token
        out.append((logits, token))
    return out


def extra_head_logits(lm: MTPLanguageModel, seq: Tensor, prompt_len: int, last: int, chosen: int, K: int) -> list:
    """Heads 2..K's logits at `last` (see `_head_chain`), each later hydra head given the argmax before it."""
    return [logits for logits, _ in _head_chain(lm, seq, prompt_len, last, chosen, [0] * (K - 1))]


def draft_path(lm: MTPLanguageModel, seq: Tensor, prompt_len: int, last: int, chosen: int, ranks) -> list:
    """The tokens of a draft tree's rank path at `last` (see `_head_chain`)."""
    return [token for _, token in _head_chain(lm, seq, prompt_len, last, chosen, ranks)]


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def counting_task(first_tokens) -> list:
    """Transcripts c, c+1, ..., whose length depends on c: learnable in a few dozen steps, and predictable ahead."""
    return [list(range(c, c + 4 + c % 5)) for c in first_tokens]


def counting_firsts(rows: int) -> torch.Tensor:
    """The first tokens c of the prompts `trained_counting_lm` returns, in row order."""
    return torch.randint(3, 24, (rows,), generator=torch.Generator().manual_seed(1))


def trained_counting_lm(kind: str = "latent", num_heads: int = 3, rows: int = 64, steps: int = 60):
    """A tiny LM trained briefly on `counting_task` (c -> c+1, c+2, ...): heads agree, drafts get accepted.
    Returns the model (float64, eval), `rows` prompts `[BOS] c` (c from `counting_firsts`) and their lengths."""
    torch.manual_seed(0)
    lm = tiny_lm(kind, num_heads=num_heads, vocab=32, dim=32, seed=40, dtype=torch.float32, randomize=False).train()
    data = counting_task(range(3, 24))
    opt = torch.optim.Adam(lm.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = lm(data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm = lm.double().eval()
    firsts = counting_firsts(rows)
    prefix = lm.embed(torch.stack([torch.full_like(firsts, lm.bos_id), firsts], 1)).detach()
    return lm, prefix, torch.full((rows,), 2)


def random_batch(lm, batch: int, seed: int, max_prompt: int = 6, max_new: int = 20):
    """Random prompts (see random_prompts) and random per-row length limits in 1..max_new."""
    g = torch.Generator().manual_seed(seed)
    prefix, lens = random_prompts(lm, batch, max_prompt, g)
    limits = torch.randint(1, max_new + 1, (batch,), generator=g)
    return prefix, lens, limits


def save_speech_checkpoint(path, model: SpeechLlama, tokenizer) -> None:
    """Write `model` as a decodable checkpoint with its tokenizer, as `train` would."""
    from mtp_asr.config import to_dict
    from mtp_asr.model.build import tokenizer_tensor
    from mtp_asr.train.checkpoint import save_checkpoint

    save_checkpoint(path, {"kind": "speech_llama", "model_config": to_dict(model.cfg),
                           "tokenizer": tokenizer_tensor(tokenizer), "model": model.state_dict()})


def speech_checkpoint(path, tokenizer_path, num_heads: int = 3, seed: Optional[int] = None) -> Path:
    """A tiny Speech-LLaMA for 80-dim fbank and the sentencepiece model at `tokenizer_path`, saved at `path` as
    `train` would. seed: random weights (`randomize_`) instead of the initial ones, under which every head agrees."""
    from mtp_asr.data.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_path)
    model = tiny_speech_llama(num_heads=num_heads, vocab=tokenizer.vocab_size, feat_dim=80)
    if seed is not None:
        randomize_(model.lm, seed)
    save_speech_checkpoint(path, model, tokenizer)
    return Path(path)
