"""Batched beam searches: `beam` (next-token) and `mtp-beam` (prefix-based, for multi-token-prediction models).

One search serves both; `beam` is `mtp-beam` with one head. The KV cache holds one row per live hypothesis of every
utterance in the batch; after each decoder call `cache.select` keeps, reorders and duplicates the rows of the
hypotheses that survive, and an utterance whose beam holds no live hypothesis leaves the batch. Decoder calls are
counted as in `mtp_asr.decode.generate`: one forward pass over the batch is a call, the prefill included, and each
utterance counts the calls it took part in.

A call feeds every live hypothesis its pending block (the tokens it was extended with last time, or the prompt) and
reads all K heads at the block's last position, the state after the hypothesis' j tokens. Candidates:

- head 1 proposes its B best tokens (B = beam size);
- each is extended with heads 2..K's argmax tokens while every earlier one was taken and the head's probability is
  >= tau, as `mtp-threshold` does: the candidate block is the longest prefix of the heads' proposal that clears the
  threshold (with B = 1 the search is exactly `mtp-threshold`); `hydra` heads propose a tail per candidate, each
  conditioned on that candidate's head-1 token, the other kinds one tail per hypothesis;
- a block stops at EOS (the hypothesis is finished, EOS scored) or at the length limit (ended unfinished), in that
  order, exactly like `generate`.

Scores follow the MTP factorisation the heads were trained for: log p(y) is the sum, over tokens, of the log-softmax
of the head that proposed the token at the state it was proposed from (head 1 for the first token of a block, head k
for its k-th). Every hypothesis records, per scored token (EOS included), the log-probability, the head and the
position j, so MWER training can re-score it the same way (head k from position j scores token j + k).

Length handling: hypotheses are ranked by `score / n ** length_norm` (n: scored tokens, EOS included), finished and
live ones alike. Each utterance keeps the B best of (ended hypotheses kept so far, new candidates); ended ones hold
their slot until better ones push them out, so the beam narrows as hypotheses end, and the utterance stops when its
B best have all ended: no live candidate then ranks above the results it would compete with. Those B ended
hypotheses are the N-best list. A plain sum (length_norm 0) favours early EOS (fewer negative terms) and, in
`mtp-beam`, hypotheses that took fewer tokens this call; with one head all live candidates of an utterance have the
same length, so `beam` ranks them as the plain sum does whatever length_norm is.

Merging: none is needed. A block is a function of its parent and its head-1 token (the tail is the parent's, or
with `hydra` heads the candidate's, cut by the same rule), so two blocks from one parent never start alike, and by
induction from the prompt every token sequence has exactly one derivation: two hypotheses never share a sequence
(tests/test_beam.py checks this against a cache-free reference). Duplicates arise only when shorter prefixes of a
block are candidates too; then max, not log-sum-exp, is the merge: the two scores estimate one probability under
two factorisations, they are not disjoint events, and adding them favours what the heads reach in several ways.
Measured and rejected (below).

Joint CTC/attention decoding (`beam` with a CTC prefix scorer, `mtp_asr.decode.ctc_prefix`): each hypothesis'
candidates are the decoder's 1.5 x B best tokens, ranked by (1 - w) x decoder + w x CTC prefix score; the token
scores, and so the N-best scores, are those sums. On the demo's dev set (B=4, lexicon) 20.62% -> 14.27% WER at w=0.5.
A word n-gram LM (`mtp_asr.decode.word_lm`, with the lexicon) adds its weighted charges to the same candidates'
scores, with or without the CTC term: 14.27% -> 11.67% at LM weight 0.5 (egs/synth/asr/RESULTS.md).

Measurements (this machine's CPU; a Speech-LLaMA with K=4 latent heads, encoder 96x2, decoder 128x3, trained 6 epochs
on a 0.63 h stand-in corpus of noisy spoken-word feature patterns with real sentencepiece BPE pieces, because the demo
corpus' model was still at chance after 5 epochs here; 300 test utterances, 1818 words; calls summed):

    epoch 6 (WER ~10%)     WER    calls      epoch 4 (WER ~20%)     WER    calls
    greedy                 9.85   5554       greedy                 20.74  5559
    beam B=4               9.85   5777       beam B=4               20.35  5758
    mtp-threshold tau .8   9.68   1546       mtp-threshold tau .9   20.41  1647
    mtp-beam B=4 tau .7    9.63   1544       mtp-beam B=4 tau .9    20.35  1679
    mtp-beam B=4 tau .5   10.40   1511       mtp-beam B=4 tau .7    20.46  1604

mtp-beam needs 0.27-0.29x the calls of beam at equal or better WER for tau 0.7-0.9 (B = 2, 4, 8 alike); a weakly
trained model (epoch 2, WER ~54%) has unsure heads and gets 0.55x. Candidate rules at B=4, tau 0.7 (epoch 6):
longest prefix only 9.63 / 1544 calls; heads 2..K only after head 1's best token 9.63 / 1876; every prefix, ranked
by its own score 9.30 / 2825 (with log-sum-exp merging 9.52 / 3600); every prefix, ranked as its longest block
9.30 / 2897 (log-sum-exp 9.35 / 3389). Every-prefix rules buy 0.3 WER with 1.9x the calls (shorter prefixes lag
behind and keep utterances alive), past the third of beam's calls that makes mtp-beam worth having, so the longest
prefix it is. length_norm 0 / 0.5 / 1 with beam B=4: epoch 6 10.23 / 9.85 / 9.85 WER (deletions 97 / 89 / 89),
epoch 4 20.52 / 20.35 / 20.35, epoch 2 51.4 / 52.9 / 54.4 (a weak model over-generates, and full normalisation
lets it). 0.5, the default, matches 1 on the trained checkpoints, recovers half of the sum's gain on the weak one,
and still outranks an early EOS (tests/test_beam.py).
"""
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from mtp_asr.decode.ctc_prefix import CTCPrefixScorer, CTCPrefixState
from mtp_asr.decode.generate import Hypothesis
from mtp_asr.decode.lattice import LatticeBuilder
from mtp_asr.decode.lexicon import Lexicon
from mtp_asr.decode.word_lm import WordLM
from mtp_asr.model.lm import MTPLanguageModel

BEAM_METHODS = ("beam", "mtp-beam")


@dataclass
class BeamHypothesis:
    tokens: list  # transcript tokens, without EOS
    token_scores: list  # log-probability of each scored token: the transcript tokens, then EOS when finished
    heads: list  # head (1..K) that proposed each scored token
    positions: list  # j: each scored token was proposed from the state after the first j transcript tokens
    finished: bool  # ended with EOS (False: stopped at the length limit)
    score: float  # sum of token_scores
    norm_score: float  # score / len(token_scores) ** length_norm: what the search ranks by


@dataclass
class BeamOutput:
    nbest: list  # per row: BeamHypothesis list, best first
    hyps: list  # per row: the best, as a generate.Hypothesis (tokens, decoder calls, finished)
    batch_calls: int  # decoder forward passes run for the whole batch
    accepted_per_head: list = field(default_factory=list)  # tokens of the best hypotheses that came from head k
    lattices: Optional[list] = None  # per row, with lattice=True: every candidate the search made (a Lattice)


@dataclass
class _Partial:
    """A hypothesis during the search. Live ones carry the block to feed next and the cache row they continue."""

    tokens: tuple
    scores: tuple
    heads: tuple
    positions: tuple
    score: float
    norm: float
    ended: bool = False
    finished: bool = False
    pending: tuple = ()
    row: int = -1
    node: int = 0  # its state in the utterance's lattice builder (when recording)
    lex: int = Lexicon.start  # its lexicon state (with a lexicon)
    cached: int = 0  # mtp-beam-verify: the cache slots of its row that it continues from
    ctc: int = 0  # joint decoding: its row among the CTC prefix states of the call's candidates
    words: tuple = ()  # with a word LM: its history (the last words, `mtp_asr.decode.word_lm`)


@torch.inference_mode()
def beam_search(lm: MTPLanguageModel, prefix: Tensor, prefix_lens: Tensor, method: str = "beam",
                num_heads: Optional[int] = None, threshold: float = 1.0, max_new_tokens=200, beam_size: int = 4,
                nbest: Optional[int] = None, length_norm: float = 0.5, lattice: bool = False,
                lexicon: Optional[Lexicon] = None, ctc: Optional[CTCPrefixScorer] = None,
                ctc_weight: float = 0.0, word_lm: Optional[WordLM] = None) -> BeamOutput:
    """Beam-search every row of `prefix` (B, P, dim; the first prefix_lens[r] positions are row r's prompt).

    method: `beam` (head 1 only) or `mtp-beam` (num_heads heads, default all of the model's; tau = threshold).
    max_new_tokens: an int or a (B,) tensor of per-row limits (>= 1), EOS excluded. nbest: hypotheses returned per
    row (default: beam_size). length_norm: the exponent of the length in the ranking score (0: plain sum).
    lattice: also return, per row, the lattice of every candidate the search made (mtp_asr.decode.lattice).
    lexicon: hypotheses made of its words only: every head's logits are masked to the tokens the lexicon allows after
    the hypothesis' tokens (and the block's before them), so the scores are renormalised over those tokens.
    ctc, ctc_weight: joint CTC/attention decoding (`mtp_asr.decode.ctc_prefix`; `beam` only): each hypothesis'
    pre_beam best tokens by the decoder are ranked by (1 - ctc_weight) x decoder + ctc_weight x CTC prefix score,
    and the token scores are those sums.
    word_lm: shallow fusion of a word n-gram LM over `lexicon`'s words (`beam` only): its weighted charges are added
    to the candidates' scores (among the same pre-beam tokens), with or without a CTC scorer.
    """
    if method not in BEAM_METHODS:
        raise ValueError(f"unknown beam search method {method!r}; choose from {', '.join(BEAM_METHODS)}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 (got {threshold})")
    K = 1 if method == "beam" else (num_heads or lm.num_heads)
    if (ctc is not None or word_lm is not None) and K > 1:
        raise ValueError("joint CTC/attention decoding and word LM fusion are built for `beam` only")
    check_word_lm(word_lm, lexicon)
    n_utts, device = prefix.shape[0], prefix.device
    nbest, limits = check_search(lm, K, beam_size, nbest, length_norm, n_utts, max_new_tokens)

    cache = lm.new_cache(n_utts, int(prefix_lens.max()) + max(limits) + K + 1, prefix_lens, dtype=prefix.dtype)
    eos, vocab = lm.eos_id, lm.decoder.cfg.vocab_size
    utt_of = list(range(n_utts))  # utterance of each live row
    live = [_Partial((), (), (), (), 0.0, 0.0, row=r, words=word_lm.start if word_lm else ()) for r in range(n_utts)]
    kept = [[] for _ in range(n_utts)]  # per utterance: the ended hypotheses among its B best
    calls = [0] * n_utts
    builders = [LatticeBuilder() for _ in range(n_utts)] if lattice else None
    folded = lm.heads.fold(lm.decoder) if K > 1 else None  # hydra heads' weights, folded once per batch
    ctc_state = ctc.initial() if ctc is not None else None
    batch_calls = 0
    block, n_pending = prefix, prefix_lens.to(device)  # the prefill feeds the prompts
    while live:
        x = block if block.dim() == 3 else lm.embed(block)
        geometry = cache.call_geometry(x.shape[1])
        hidden = lm.decoder(x, cache, geometry)
        states = lm.heads.states(lm.decoder, hidden, cache, geometry, lazy=True)
        batch_calls += 1
        cache.lengths += n_pending
        rows, last = torch.arange(len(live), device=device), n_pending - 1
        logits = lm.heads.logits(lm.decoder, 0, states[0][rows, last])
        if lexicon:
            logits = lexicon.constrain(logits, [h.lex for h in live])
        if ctc is None and word_lm is None:
            top_lp, top_tok = _log_softmax(logits).topk(min(beam_size, vocab), dim=-1)
        else:
            joint, pre_tok, ctc_next = joint_scores(_log_softmax(logits), beam_size, ctc, ctc_state, ctc_weight,
                                                    word_lm, [h.words for h in live], [h.lex for h in live])
            top_lp, col = joint.topk(min(beam_size, joint.shape[1]), dim=-1)
            top_tok, top_col = pre_tok.gather(1, col), (col + rows[:, None] * joint.shape[1]).tolist()
        n_top = top_tok.shape[1]
        per_candidate = lm.heads.conditional or lexicon is not None
        if K > 1:
            if per_candidate:  # one tail per head-1 candidate, conditioned on it (hydra) or constrained after it
                index = (rows.repeat_interleave(n_top), last.repeat_interleave(n_top))
                constrain = None
                if lexicon:
                    after = [lexicon.step(h.lex, t) for h, toks in zip(live, top_tok.tolist()) for t in toks]
                    constrain = lexicon.chain_constraint(after)
                extra_logits = lm.heads.logits_at(lm.decoder, states, index, range(1, K), top_tok.flatten(),
                                                  constrain, folded)
            else:  # one tail per row, shared by its candidates
                extra_logits = lm.heads.logits_at(lm.decoder, states, (rows, last), range(1, K))  # (rows, K-1, V)
            extra = extra_logits.argmax(-1, keepdim=True)
            extra_lp = _log_softmax(extra_logits).gather(-1, extra)[..., 0].tolist()
            # The acceptance test exactly as mtp-threshold computes it, so beam size 1 reproduces it bit for bit.
            extra_p = torch.softmax(extra_logits.float(), -1).gather(-1, extra)[..., 0]
            run = (extra_p >= threshold).long().cumprod(dim=1).sum(dim=1).tolist()
            extra = extra[..., 0].tolist()
        top_lp, top_tok = top_lp.tolist(), top_tok.tolist()

        candidates = {}  # utterance -> candidates, in row order
        for i, (hyp, u) in enumerate(zip(live, utt_of)):
            out = candidates.setdefault(u, [])
            for c, (tok, lp) in enumerate(zip(top_tok[i], top_lp[i])):
                if lp == float("-inf"):  # fewer tokens allowed by the lexicon than the beam is wide
                    continue
                t = i * n_top + c if per_candidate else i
                tail = list(zip(extra[t][: run[t]], extra_lp[t][: run[t]])) if K > 1 else []
                cand = _extend(hyp, i, [(tok, lp)] + tail, eos, limits[u], length_norm)
                if word_lm:
                    cand.words = word_lm.advance(hyp.words, hyp.lex, cand.tokens[len(hyp.tokens):])
                if lexicon:
                    cand.lex = lexicon.advance(hyp.lex, cand.tokens[len(hyp.tokens):])
                if ctc is not None:
                    cand.ctc = top_col[i][c]
                if builders:
                    n = len(hyp.scores)
                    cand.node = builders[u].extend(hyp.node, cand.tokens[len(hyp.tokens):], cand.scores[n:],
                                                   cand.heads[n:], cand.finished, cand.positions[n:])
                out.append(cand)
        next_live, next_utt = _prune(candidates, kept, calls, beam_size)
        if not next_live:
            break
        cache.select(torch.tensor([h.row for h in next_live], device=device))
        if ctc is not None:
            ctc_state = ctc_next.select(torch.tensor([h.ctc for h in next_live], device=ctc_next.utt.device))
        live, utt_of = next_live, next_utt
        block, n_pending = _pad([h.pending for h in live], device)

    nbest_lists = [[_public(h) for h in kept[u][:nbest]] for u in range(n_utts)]
    hyps = [Hypothesis(hs[0].tokens, calls[u], hs[0].finished) for u, hs in enumerate(nbest_lists)]
    from_head = [0] * K
    for hs in nbest_lists:
        for head in hs[0].heads[: len(hs[0].tokens)]:
            from_head[head - 1] += 1
    return BeamOutput(nbest_lists, hyps, batch_calls, from_head,
                      [b.build() for b in builders] if builders else None)


def check_search(lm: MTPLanguageModel, K: int, beam_size: int, nbest: Optional[int], length_norm: float, n_utts: int,
                 max_new_tokens) -> tuple[int, list]:
    """The options every beam search shares, checked: returns nbest (default: beam_size) and the per-row limits."""
    if not 1 <= K <= lm.num_heads:
        raise ValueError(f"--num-heads must be in 1..{lm.num_heads} for this model (got {K})")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1 (got {beam_size})")
    nbest = beam_size if nbest is None else nbest
    if not 1 <= nbest <= beam_size:
        raise ValueError(f"nbest must be in 1..beam_size ({beam_size}) (got {nbest})")
    if length_norm < 0:
        raise ValueError(f"length_norm must be >= 0 (got {length_norm})")
    limits = torch.as_tensor(max_new_tokens).expand(n_utts).tolist()
    if min(limits) < 1:
        raise ValueError(f"max_new_tokens must be >= 1 for beam search (got {min(limits)})")
    return nbest, limits


def _log_softmax(logits: Tensor) -> Tensor:
    """Log-probabilities in at least float32 (a bf16 model's logits would round the scores)."""
    return torch.log_softmax(logits.float() if logits.dtype.itemsize < 4 else logits, dim=-1)


def check_word_lm(word_lm: Optional[WordLM], lexicon: Optional[Lexicon]) -> None:
    if word_lm is not None and word_lm.lexicon is not lexicon:
        raise ValueError("word LM fusion needs the search to use the word LM's lexicon (--lexicon)")


def joint_scores(log_probs: Tensor, beam_size: int, ctc: Optional[CTCPrefixScorer] = None,
                 state: Optional[CTCPrefixState] = None, weight: float = 0.0, word_lm: Optional[WordLM] = None,
                 histories: Sequence = (), lex_states: Sequence = (), pre_beam_factor: float = 1.5
                 ) -> tuple[Tensor, Tensor, Optional[CTCPrefixState]]:
    """Joint decoding's candidates after each hypothesis: the decoder's pre-beam best tokens of `log_probs` (H, V)
    (1.5 x the beam, as in ESPnet: the CTC and LM terms reorder the decoder's likely tokens, they do not propose
    unlikely ones), their scores (1 - weight) x decoder + weight x CTC prefix score (with `ctc`) + the word LM's
    charges (with `word_lm`, after each hypothesis' history and lexicon state) (H, P), and the extended prefixes'
    CTC states (row i * P + j for token j of hypothesis i; None without `ctc`). Tokens the lexicon rules out keep
    -inf."""
    pre_lp, pre_tok = log_probs.topk(min(max(int(pre_beam_factor * beam_size), beam_size), log_probs.shape[1]), -1)
    joint, states = pre_lp.double(), None
    if ctc is not None:
        added, states = ctc.extend(state, pre_tok.to(ctc.x.device))
        joint = (1 - weight) * joint + weight * added.to(pre_lp.device)
    if word_lm is not None:
        joint = joint + torch.tensor(word_lm.charges(histories, lex_states, pre_tok.tolist()), dtype=joint.dtype,
                                     device=joint.device)
    return joint.masked_fill(pre_lp == float("-inf"), float("-inf")), pre_tok, states


def _extend(hyp: _Partial, row: int, block: list, eos: int, limit: int, length_norm: float,
            next_token: bool = False) -> _Partial:
    """`hyp` extended with `block` [(token, log-prob)], cut at EOS or at the length limit. The block's k-th token was
    scored by head k from the state before the block (mtp-beam), or with next_token by head 1 from the state right
    before it (mtp-beam-verify)."""
    tokens, scores, heads, positions = list(hyp.tokens), list(hyp.scores), list(hyp.heads), list(hyp.positions)
    j = len(hyp.tokens)
    score, ended, finished, fed = hyp.score, False, False, []
    for k, (tok, lp) in enumerate(block, start=1):
        scores.append(lp)
        heads.append(1 if next_token else k)
        positions.append(len(tokens) if next_token else j)
        score += lp
        if tok == eos:
            ended = finished = True
            break
        tokens.append(tok)
        fed.append(tok)
        if len(tokens) >= limit:
            ended = True
            break
    norm = score / len(scores) ** length_norm
    return _Partial(tuple(tokens), tuple(scores), tuple(heads), tuple(positions), score, norm, ended, finished,
                    () if ended else tuple(fed), row)


def _best(pool: list, beam_size: int) -> list:
    """The beam_size best by `norm` (a stable sort: ties keep the pool's order, so batching changes nothing)."""
    return sorted(pool, key=lambda h: -h.norm)[:beam_size]


def _prune(candidates: dict, kept: list, calls: list, beam_size: int) -> tuple[list, list]:
    """One call's pruning, per utterance that took part in it (counted in `calls`): the beam_size best of its ended
    hypotheses so far and its new candidates; the ended ones stay in `kept`, the live ones and their utterances are
    returned, to be fed next."""
    live, utt_of = [], []
    for u, cands in candidates.items():
        calls[u] += 1
        best = _best(kept[u] + cands, beam_size)
        kept[u] = [h for h in best if h.ended]
        survivors = [h for h in best if not h.ended]
        live += survivors
        utt_of += [u] * len(survivors)
    return live, utt_of


def _pad(blocks: list, device) -> tuple[Tensor, Tensor]:
    width = max(len(b) for b in blocks)
    out = torch.zeros(len(blocks), width, dtype=torch.long)
    for i, b in enumerate(blocks):
        out[i, : len(b)] = torch.tensor(b)
    return out.to(device), torch.tensor([len(b) for b in blocks], device=device)


def _public(h: _Partial) -> BeamHypothesis:
    return BeamHypothesis(list(h.tokens), list(h.scores), list(h.heads), list(h.positions), h.finished, h.score,
                          h.norm)
