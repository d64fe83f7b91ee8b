"""Passages: what one utterance of the synthetic corpus says, 1 to 3 sentences spoken as one recording.

Why passages: with K-token prediction a decoder needs at best 1 + ceil(U/K) calls for U tokens against U + 1 for
greedy decoding. On the test set, with BPE vocabularies of 1000 to 128, single sentences of ~6 words capped that
ideal ratio at K=4 at 2.6-3.1x; passages of ~18 words (U = 21-41 tokens) raise it to 3.3-3.6x and come closer to
real corpora (LibriSpeech utterances last ~12 s). Longer passages would cost CPU training time (attention,
padding) for little gain in that ratio, and use the sentence pool up faster.

How: the pool's sentences come as units, either a run of consecutive sentences of one fortune cookie or WordNet
gloss (about a sixth of the pool, kept together and in order because they read as one text), or a single sentence.
Units are taken from a shuffled queue until the passage reaches a word target drawn from TARGET_WORDS or holds
MAX_SENTENCES; the unit added is the first of the next LOOKAHEAD that fits within MAX_WORDS and, when it fills the
last place, brings the passage to MIN_WORDS. The pool's sentences average 6 words, so most passages hold three.
Measured on the 800-word pool (3.0k sentences, 1.04k passages): 9-30 words, mean 17.7, 10th/50th/90th percentile
13/17/24; 92% three sentences, 8% two, 0.2% one; 1% under 12 words (runs of three short sentences); 23% read a
run.
"""
import random
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from synth_sentences import SentencePool

MAX_SENTENCES = 3
MIN_WORDS, MAX_WORDS = 12, 30
TARGET_WORDS = (15, 24)
LOOKAHEAD = 20
_SENTENCE_END = (".", "!", "?")

Unit = Tuple[int, ...]  # sentence indices into the pool


@dataclass(frozen=True)
class Passage:
    sentence_indices: Tuple[int, ...]
    text: str  # the transcript: the sentences' normalised texts joined by spaces
    spoken: str  # what the engines read: each sentence capitalised and closed by . ! or ?, so it ends with a pause

    @property
    def words(self) -> int:
        return len(self.text.split())


def spoken_sentence(spoken: str) -> str:
    """The sentence as one of several in a passage: a capital first letter and a closing stop (WordNet examples
    have neither), so the engines pause and reset intonation between sentences."""
    spoken = spoken.rstrip(",;: ")
    if not spoken.endswith(_SENTENCE_END):
        spoken += "."
    return spoken[:1].upper() + spoken[1:]


def make_passage(pool: SentencePool, indices: Sequence[int]) -> Passage:
    sentences = [pool.sentences[i] for i in indices]
    return Passage(tuple(indices), " ".join(s.text for s in sentences),
                   " ".join(spoken_sentence(s.spoken) for s in sentences))


def passage_units(pool: SentencePool, sentences: Iterable[int]) -> List[Unit]:
    """The given sentences as units, in pool order: runs (cut to fit a passage) and single sentences."""
    chosen = set(sentences)
    units, in_runs = [], set()
    for run in pool.runs:
        run = [i for i in run if i in chosen]
        in_runs.update(run)
        unit: List[int] = []
        for i in run:
            if len(unit) == MAX_SENTENCES or _words(pool, unit + [i]) > MAX_WORDS:
                units.append(tuple(unit))
                unit = []
            unit.append(i)
        if unit:
            units.append(tuple(unit))
    units += [(i,) for i in sorted(chosen - in_runs)]
    return sorted(units)


def form_passages(pool: SentencePool, units: Sequence[Unit], rng: random.Random) -> List[Passage]:
    """Passages that use every unit once, in about the units' order (see the module doc)."""
    queue = list(units)
    passages = []
    while queue:
        target = rng.randint(*TARGET_WORDS)
        indices = list(queue.pop(0))
        while len(indices) < MAX_SENTENCES and _words(pool, indices) < target:
            pick = _next_unit(pool, indices, queue)
            if pick is None:
                break
            indices += queue.pop(pick)
        passages.append(make_passage(pool, indices))
    return passages


def _next_unit(pool: SentencePool, indices: List[int], queue: List[Unit]) -> Optional[int]:
    """Position in `queue` of the unit to add: the first that fits, preferring one that does not end the passage
    short of MIN_WORDS; None when none of the next LOOKAHEAD fits."""
    fitting = None
    for pos, unit in enumerate(queue[:LOOKAHEAD]):
        words = _words(pool, indices + list(unit))
        if len(indices) + len(unit) > MAX_SENTENCES or words > MAX_WORDS:
            continue
        if len(indices) + len(unit) < MAX_SENTENCES or words >= MIN_WORDS:
            return pos
        if fitting is None:
            fitting = pos
    return fitting


def _words(pool: SentencePool, indices: Sequence[int]) -> int:
    return sum(len(pool.sentences[i].text.split()) for i in indices)
