"""External drafts for verification decoding: the encoder's CTC transcript, re-aligned as the decoder corrects it.

The CTC head sees the whole utterance, so its transcript (`mtp_asr.decode.ctc_search`: best path, or a prefix beam
search over the lexicon's words) drafts the entire output for next to nothing (the encoder runs anyway). The decoder
then verifies long stretches of it per call. When the decoder rejects a draft token and emits its own, the rest of
the CTC draft is not thrown away: `DraftAligner` keeps an end-free edit-distance alignment of everything emitted so
far against the CTC sequence and drafts from where the emitted text ends in it, so a CTC substitution, insertion or
deletion costs one extra call instead of the rest of the draft.
"""
from typing import Optional, Sequence

import numpy as np
import torch

from mtp_asr.decode.ctc_search import ctc_transcripts
from mtp_asr.decode.lexicon import Lexicon


def retokenize(texts: Sequence[str], tokenizer) -> list:
    """Drafts from text (e.g. another recogniser's output, or a CTC model with its own vocabulary)."""
    return [tokenizer.encode(t) for t in texts]


def ctc_drafts(log_probs: torch.Tensor, lens: torch.Tensor, blank: int, ctc_tokenizer=None, tokenizer=None,
               beam: int = 1, lexicon: Optional[Lexicon] = None) -> list:
    """CTC transcripts (`ctc_transcripts`: best path, or a prefix beam search over `lexicon`'s words, a lexicon over
    the CTC head's tokens) as decoder tokens: as they are when the CTC head predicts the decoder's tokens, else
    decoded with the CTC head's own tokenizer and re-tokenised with the decoder's. Re-tokenised text may split
    differently from what the decoder emits; the aligner absorbs that as it absorbs CTC errors."""
    return to_decoder_tokens(ctc_transcripts(log_probs, lens, blank, beam, lexicon), ctc_tokenizer, tokenizer)


def to_decoder_tokens(seqs: Sequence[Sequence[int]], ctc_tokenizer=None, tokenizer=None) -> list:
    """CTC head token sequences in the decoder's tokens: as they are without a CTC tokenizer of its own, else
    decoded with it and re-tokenised."""
    if ctc_tokenizer is None:
        return [list(s) for s in seqs]
    return retokenize([ctc_tokenizer.decode(s) for s in seqs], tokenizer)


class DraftAligner:
    """Where the emitted tokens end in a draft sequence, by end-free edit distance, kept up to date per token.

    `cost[i]` is the edit distance between the emitted tokens and draft[:i]; the continuation starts at the largest
    i with the lowest cost (on a tie between "the draft missed a token" and "the draft has a wrong token", the
    latter, which continues further along the draft). After a correction the tie is common and either reading may be
    the right one, so `continuations` offers the draft from each of the last few tied positions, to be verified side
    by side. One numpy pass of O(len(draft)) per emitted token.
    """

    def __init__(self, draft: Sequence[int]):
        self.draft = np.asarray(list(draft), dtype=np.int64)
        self.cost = np.arange(len(self.draft) + 1, dtype=np.int64)
        self.index = np.arange(len(self.draft) + 1, dtype=np.int64)

    def advance(self, tokens: Sequence[int]) -> None:
        for tok in tokens:
            prev = self.cost
            new = np.empty_like(prev)
            # Match/substitute from the diagonal, or the emitted token is extra (from above)...
            new[1:] = np.minimum(prev[:-1] + (self.draft != tok), prev[1:] + 1)
            new[0] = prev[0] + 1
            # ...or draft tokens are skipped (from the left): a running minimum of cost - i, plus i.
            self.cost = np.minimum.accumulate(new - self.index) + self.index

    def continuations(self, limit: int, branches: int) -> list:
        """The draft from each of the `branches` largest positions of the lowest cost, the best reading first."""
        starts = np.flatnonzero(self.cost == self.cost.min())[::-1][:branches]
        return [self.draft[s: s + limit].tolist() for s in starts]


def draft_sequences(drafts: Optional[Sequence[Sequence[int]]], eos: int) -> Optional[list]:
    """Draft sequences end with EOS, so a complete, correct draft finishes the utterance in the same call."""
    return None if drafts is None else [list(d) + [eos] for d in drafts]
