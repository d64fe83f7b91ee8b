"""Batched autoregressive decoding with multi-token prediction: `greedy`, `mtp-threshold` and `mtp-verify` share
one loop over decoder calls.

Each call feeds every live row a block `[pending tokens][drafts]` (right-padded to the longest row) into the KV cache
after that row's accepted positions (see `mtp_asr.model.llama` for the per-row cache lengths):

- pending tokens are already part of the output but not yet in the cache;
- drafts are guesses, checked in this very call: a draft is accepted when it equals head 1's argmax at the position
  before it and the drafts before it were accepted (blockwise parallel decoding, Stern et al. 2018). The drafts of
  a row form a tree (`mtp_asr.decode.tree`): a chain by default, or with `draft_tree` several combinations of the heads'
  top candidates (`mtp_asr.decode.tree_spec`), verified at once with tree attention; the accepted path is the longest
  one that matches.

Head 1's argmax at the last kept position is always emitted (the correction after a rejected draft, or a bonus token
after all were accepted). What happens with heads 2..K at that position is the method:

- `greedy` (K = 1): nothing; one token per call.
- `mtp-threshold`: head k's argmax is emitted too while every earlier one was and its probability >= tau; all the
  emitted tokens are fed (pending) in the next call. Lossy.
- `mtp-verify`: heads 2..K give the next call's drafts (their top-w_k tokens with a draft tree; `hydra` heads one
  after another, each given the token before its own, from the correction on). Output identical to greedy.
- `ctc-verify`: an external sequence per row (the encoder's CTC transcript, see `mtp_asr.decode.drafts`) drafts up to
  `max_draft` tokens per call, already in the prefill call, re-aligned to what was emitted after each rejection
  (with `draft_branches` > 1, from each equally good alignment, a branch each); the heads' drafts are verified beside
  it as another branch of the same tree, so a call keeps whichever source guessed further. Output identical to greedy.

A row leaves the batch (and its cache rows are dropped) once it emits EOS or reaches its length limit.
Decoder calls are counted per utterance (the calls its row took part in, independent of batching) and per batch.
"""
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from mtp_asr.decode.drafts import DraftAligner, draft_sequences
from mtp_asr.decode.lexicon import DEAD, Lexicon
from mtp_asr.decode.tree import DraftTree, TreeBatch, head_paths, move_plan
from mtp_asr.decode.tree_spec import check_paths, parse_tree, product_paths, tree_depth
from mtp_asr.model.lm import MTPLanguageModel

METHODS = ("greedy", "mtp-threshold", "mtp-verify", "ctc-verify")


@dataclass
class Hypothesis:
    tokens: list  # transcript tokens, without EOS
    decoder_calls: int  # calls this utterance took part in (the prefill included)
    finished: bool = False  # emitted EOS (False: stopped at the length limit)


@dataclass
class GenerateOutput:
    hyps: list  # one Hypothesis per row, in input order
    batch_calls: int  # decoder forward passes run for the whole batch
    accepted_per_head: list = field(default_factory=list)  # emitted tokens that came from head k (k = 1..K)
    accepted_external: int = 0  # emitted tokens that came from external (CTC) drafts


@torch.inference_mode()
def generate(lm: MTPLanguageModel, prefix: Tensor, prefix_lens: Tensor, method: str = "greedy",
             num_heads: Optional[int] = None, threshold: float = 1.0, max_new_tokens=200,
             drafts: Optional[Sequence[Sequence[int]]] = None, max_draft: int = 32, draft_branches: int = 1,
             draft_tree=(), lexicon: Optional[Lexicon] = None) -> GenerateOutput:
    """Decode every row of `prefix` (B, P, dim; the first prefix_lens[r] positions are row r's prompt).

    num_heads: heads to use (default: all of the model's; `greedy` uses 1). max_new_tokens: an int or a (B,) tensor
    of per-row limits, EOS excluded. drafts (ctc-verify): one token sequence per row (without EOS); max_draft: draft
    tokens verified per call at most; draft_branches: after a correction, the draft from up to this many equally good
    alignments of the emitted text to it, each a branch of the call's tree (`DraftAligner.continuations`).
    draft_tree (mtp-verify, ctc-verify): the shape of the tree of head drafts verified per call
    (`mtp_asr.decode.tree_spec`): `--draft-tree` text, widths per head 2..K, or rank paths; empty: a chain.
    lexicon: emit only its words (`mtp_asr.decode.lexicon`); verification then reproduces constrained greedy.
    """
    if method not in METHODS:
        raise ValueError(f"unknown decoding method {method!r}; choose from {', '.join(METHODS)}")
    K = 1 if method == "greedy" else (num_heads or lm.num_heads)
    if not 1 <= K <= lm.num_heads:
        raise ValueError(f"--num-heads must be in 1..{lm.num_heads} for this model (got {K})")
    if method == "mtp-threshold" and threshold < 0:
        raise ValueError(f"threshold must be >= 0 (got {threshold})")
    B, device = prefix.shape[0], prefix.device
    # On the host: the emit loop compares them per token, which on a GPU would be a synchronisation each.
    limits = torch.as_tensor(max_new_tokens).expand(B).tolist()
    if min(limits) < 1:
        raise ValueError(f"max_new_tokens must be >= 1 for every row (got {limits})")
    if method == "ctc-verify" and (drafts is None or len(drafts) != B or max_draft < 1 or draft_branches < 1):
        raise ValueError("ctc-verify needs one draft sequence per row, max_draft >= 1 and draft_branches >= 1")
    verify = method in ("mtp-verify", "ctc-verify")
    rank_paths = tree_paths(draft_tree, K)
    if verify and tree_depth(rank_paths) > K - 1:
        raise ValueError(f"the draft tree (--draft-tree) reaches depth {tree_depth(rank_paths)}, but heads 2..{K} "
                         f"draft only {K - 1} tokens")
    top = max((r for p in rank_paths for r in p), default=0) + 1  # candidates needed per head
    aligners = [DraftAligner(d) for d in draft_sequences(drafts, lm.eos_id)] if method == "ctc-verify" else None

    folded = lm.heads.fold(lm.decoder) if K > 1 else None  # hydra heads' weights, folded once per batch
    lookahead = (max_draft * draft_branches if aligners else 0) + len(rank_paths) + K
    cache = lm.new_cache(B, int(prefix_lens.max()) + max(limits) + 2 * lookahead + 1, prefix_lens,
                         dtype=prefix.dtype)
    rows = torch.arange(B, device=device)  # original row index of each live row
    out = [[] for _ in range(B)]
    calls = [0] * B
    done = [False] * B
    lex = [Lexicon.start] * B  # each row's lexicon state after its emitted tokens
    from_head = [0] * K
    from_external = 0
    eos = lm.eos_id

    # The first call is the prefill: the prompts are "pending", followed by external drafts if there are any.
    # Drafts never reach past a row's length limit: they could not be emitted, and their positions might not exist.
    first = ([a.continuations(min(max_draft, n), 1)[0] for a, n in zip(aligners, limits)] if aligners
             else [[] for _ in range(B)])
    block, _ = lm.append_tokens(prefix, prefix_lens, first)
    n_pending = prefix_lens.clone()
    tree = TreeBatch([DraftTree.from_paths([(d, [0] * len(d))]) for d in first], n_pending, block.shape[1])
    batch_calls = 0
    while rows.numel():
        T = block.shape[1]
        x = block if block.dim() == 3 else lm.embed(block)
        geometry = cache.call_geometry(T, tree.offsets, tree.visible)
        hidden = lm.decoder(x, cache, geometry)
        states = lm.heads.states(lm.decoder, hidden, cache, geometry, lazy=True)
        batch_calls += 1
        live = rows.shape[0]
        ar = torch.arange(live, device=device)

        # Head 1 at the last pending position (the root) and at every draft node: verifies them, gives the next
        # token at the last kept position.
        cols = ((n_pending - 1)[:, None] + torch.arange(tree.q + 1, device=device)).clamp(max=T - 1)
        g = lm.heads.logits(lm.decoder, 0, states[0][ar[:, None], cols])  # (live, q+1, V)
        if lexicon:
            g = lexicon.constrain(g, _node_states(lexicon, [lex[r] for r in rows.tolist()], tree.trees, tree.q))
        g = g.argmax(-1)
        accepted, last_col = tree.accept(g)
        correction = g[ar, last_col]
        last = n_pending - 1 + last_col  # the last kept position in this call's block
        acc_l, col_l, pend_l = accepted.tolist(), last_col.tolist(), n_pending.tolist()
        plan = None if tree.chain else move_plan(tree, col_l, pend_l, cache.lengths.tolist())
        if plan:
            cache.move(*(torch.tensor(x, device=device) for x in plan))
        cache.lengths += n_pending + accepted

        # Heads 2..K at the last kept position.
        extra = extra_p = drafted = None
        if K > 1 and verify and lm.heads.conditional:  # each head given the token before it, node by node
            drafted = lm.heads.tree_drafts(lm.decoder, states, (ar, last), correction, rank_paths, folded)
        elif K > 1 and (verify or method == "mtp-threshold"):
            constrain = None
            if lexicon and not verify:  # emitted tokens must extend the lexicon's words; drafts are only guesses
                chain = [lexicon.step(lex[r], t) for r, t in zip(rows.tolist(), correction.tolist())]
                constrain = lexicon.chain_constraint(chain)
            logits = lm.heads.logits_at(lm.decoder, states, (ar, last), range(1, K), correction, constrain,
                                        folded)  # (live, K-1, V)
            if verify and top > 1:
                extra = logits.topk(top, dim=-1).indices  # (live, K-1, top)
            else:
                extra = logits.argmax(-1, keepdim=True)  # (live, K-1, 1)
            if not verify:
                extra_p = torch.softmax(logits.float(), -1).gather(-1, extra)[..., 0]

        # Emit, on the host: the accepted path, the correction, and (threshold) confident head tokens.
        corr_l = correction.tolist()
        extra_l = extra.tolist() if extra is not None else None
        if extra_p is not None:
            confident = (extra_p >= threshold).long().cumprod(dim=1).sum(dim=1).tolist()
        keep, next_pending, next_trees = [], [], []
        for i, r in enumerate(rows.tolist()):
            calls[r] += 1
            path = tree.trees[i].path(col_l[i] - 1) if col_l[i] else []
            new = [tree.trees[i].tokens[n] for n in path] + [corr_l[i]]
            # Where each emitted token came from: 1..K a head, 0 an external draft.
            sources = [tree.trees[i].sources[n] for n in path] + [1]
            if extra_p is not None:
                new += [c[0] for c in extra_l[i][: confident[i]]]
                sources += list(range(2, 2 + confident[i]))
            finished = False
            for tok, src in zip(new, sources):
                if tok == eos:
                    finished = True
                    done[r] = True
                    break
                out[r].append(tok)
                if lexicon:
                    lex[r] = lexicon.step(lex[r], tok)
                if src:
                    from_head[src - 1] += 1
                else:
                    from_external += 1
                if len(out[r]) >= limits[r]:
                    finished = True
                    break
            if finished:
                continue
            keep.append(i)
            next_pending.append(new[acc_l[i]:])  # the accepted drafts are in the cache already
            paths = []
            if aligners:
                aligners[r].advance(new)
                paths += [(ext, [0] * len(ext)) for ext in
                          aligners[r].continuations(min(max_draft, limits[r] - len(out[r])), draft_branches)]
            if drafted:
                paths += [(d, list(range(2, 2 + len(d)))) for d in drafted[i]]
            elif verify and extra_l:
                paths += head_paths(extra_l[i], rank_paths)
            next_trees.append(DraftTree.from_paths(paths))
        if not keep:
            break
        if len(keep) < live:
            idx = torch.tensor(keep, device=device)
            cache.select(idx)
            rows = rows[idx]
        block, n_pending = _next_block(next_pending, next_trees, device)
        tree = TreeBatch(next_trees, n_pending, block.shape[1])

    hyps = [Hypothesis(out[r], calls[r], done[r]) for r in range(B)]
    return GenerateOutput(hyps, batch_calls, from_head, from_external)


def _node_states(lexicon: Lexicon, roots: list, trees: list, q: int) -> list:
    """Lexicon states at each row's root and draft nodes (the columns head 1 is read at), padded with DEAD to q+1."""
    out = []
    for root, tree in zip(roots, trees):
        row = [root]
        for tok, parent in zip(tree.tokens, tree.parents):
            row.append(lexicon.step(row[parent + 1], tok))
        out += row + [DEAD] * (q + 1 - len(row))
    return out


def _next_block(pending: list, trees: list, device) -> tuple[Tensor, Tensor]:
    """Each row's pending tokens followed by its draft nodes, right-padded; and the pending counts."""
    width = max(len(p) + len(t) for p, t in zip(pending, trees))
    block = torch.zeros(len(pending), width, dtype=torch.long)
    for i, (p, t) in enumerate(zip(pending, trees)):
        block[i, : len(p) + len(t)] = torch.tensor(p + t.tokens)
    return block.to(device), torch.tensor([len(p) for p in pending], device=device)


def tree_paths(draft_tree, num_heads: int) -> tuple:
    """The rank paths of a draft tree given as `--draft-tree` text, widths (ints) or rank paths; () -> the chain."""
    if isinstance(draft_tree, str):
        draft_tree = parse_tree(draft_tree)
    draft_tree = tuple(draft_tree)
    if not draft_tree:
        return product_paths((1,) * (num_heads - 1))
    if all(isinstance(w, int) for w in draft_tree):
        if min(draft_tree) < 1:
            raise ValueError(f"draft tree widths must be >= 1 (got {draft_tree})")
        return product_paths(draft_tree)
    check_paths(draft_tree)
    return draft_tree
