"""Real English sentences for the synthetic corpus, from Debian text packages, restricted to a small vocabulary.

Sources: the double-quoted usage examples inside WordNet glosses (`/usr/share/wordnet/data.*`, package
wordnet-base) and the fortune files (`/usr/share/games/fortunes/`, packages fortunes and fortunes-min; the
offensive ones live in the `off/` subfolder, which is never read, and the ASCII-art files are skipped).

A sentence is kept when it is plain prose that every engine speaks exactly as its transcript says: letters,
apostrophes and ordinary punctuation only (no digits, symbols or all-capital acronyms, which TTS engines spell
out or expand), no single-letter words other than A and I (initials like "J. R.") and 3 to 16 words.
About 56k distinct sentences pass; then only those whose words are all among the most frequent VOCAB_SIZE
words are kept.

Sentences that follow each other in one fortune cookie or WordNet gloss are also recorded as runs, so that a
passage (synth_passages) can read them together, in order.

Why VOCAB_SIZE = 800 (measured here: distinct surviving sentences, and their hours at the ~1.9 s that a sentence
of ~6 words lasts within a passage):
    500 words -> 1.7k sentences (0.9 h)   1000 words -> 3.9k (2.1 h)
    800 words -> 3.0k sentences (1.6 h)   2000 words -> 8.3k (4.7 h)
The demo trains for ~15 minutes on a 2-core CPU on 0.5-1 h of speech, i.e. 5-10k spoken words: with 800 types
about half of them occur ten times or more in the sentence pool, so most test words have been heard in training,
while 3.0k distinct sentences still give every train passage of a 0.5-1 h corpus fresh sentences and leave
1.3k-2k sentences unspoken, as extra LM text. Larger corpora regroup the train sentences into new passages (dev
and test sentences never).
"""
import collections
import functools
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence, Tuple

from mtp_asr.text import normalize_text

VOCAB_SIZE = 800
MIN_WORDS, MAX_WORDS = 3, 16
WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNE_DIR = Path("/usr/share/games/fortunes")
FORTUNE_SKIP = {"art", "ascii-art"}  # pictures, not prose

_PROSE = re.compile(r"^[A-Za-z' ,.;:!?\"()-]+$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ATTRIBUTION = re.compile(r"(?m)^\s*--")  # fortune attributions: "\t\t-- Mark Twain"
_QUOTED = re.compile(r'"([^"]+)"')
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_WORDLESS = re.compile(r'[()"]|(?<!\w)-|-(?!\w)')  # brackets, quotes and loose dashes


@dataclass(frozen=True)
class Sentence:
    text: str  # the normalised transcript (mtp_asr.text.normalize_text)
    spoken: str  # what the engines are given: same words, original case and punctuation for natural prosody


@dataclass(frozen=True)
class Candidates:
    sentences: Tuple[Sentence, ...]  # distinct, sorted by text
    runs: Tuple[Tuple[str, ...], ...]  # transcripts of 2+ consecutive clean sentences of one fortune or gloss


@dataclass(frozen=True)
class SentencePool:
    sentences: Tuple[Sentence, ...]  # sorted by text, so a sentence's index is stable for a vocabulary size
    runs: Tuple[Tuple[int, ...], ...]  # indices of 2+ consecutive kept sentences of one source; disjoint
    vocabulary: Tuple[str, ...]  # the words the kept sentences use, sorted
    candidates: int  # sentences that passed the prose filters before the vocabulary restriction


def wordnet_glosses(wordnet_dir: Path = WORDNET_DIR) -> Iterator[List[str]]:
    """The quoted examples of each gloss, one list per synset: `... | gloss text; "example one"; "example two"`."""
    for path in sorted(wordnet_dir.glob("data.*")):
        with path.open(encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):  # the licence header
                    continue
                examples = _QUOTED.findall(line.partition(" | ")[2])
                if examples:
                    yield examples


def fortune_cookies(fortune_dir: Path = FORTUNE_DIR) -> Iterator[List[str]]:
    """The sentences of each (non-offensive) fortune cookie, without its attribution, one list per cookie."""
    for path in sorted(fortune_dir.iterdir()):
        if path.suffix or not path.is_file() or path.name in FORTUNE_SKIP:  # .dat indexes, .u8 links
            continue
        for cookie in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            cookie = " ".join(_ATTRIBUTION.split(cookie)[0].split())
            if cookie:
                yield _SENTENCE_END.split(cookie)


def speakable(raw: str) -> str:
    """The sentence as the engines should read it, or "" when it is not plain prose they would read verbatim."""
    text = raw
    if not text.isascii():  # fold accents (café) and typographic apostrophes
        text = unicodedata.normalize("NFKD", text)
        text = "".join(c for c in text if not unicodedata.combining(c)).replace("\u2019", "'")
    if not _PROSE.match(text):
        return ""
    text = _WORDLESS.sub(" ", text.replace("--", ", "))
    words = text.split()
    bare = [w.strip("',.;:!?-") for w in words]
    if any(len(b) > 1 and b.isupper() for b in bare):  # acronyms and shouting are spelled out or odd
        return ""
    return _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(words)).lstrip(",.;:!?' ")


def _is_clean(text: str) -> bool:
    words = text.split()
    return MIN_WORDS <= len(words) <= MAX_WORDS and all(len(w) > 1 or w in ("A", "I") for w in words)


def candidate_sentences(documents: Iterable[Sequence[str]]) -> Candidates:
    """Distinct clean sentences of the documents, and the runs of consecutive clean ones within a document."""
    best = {}
    runs = {}  # an ordered set: a cookie may be in several fortune files
    for document in documents:
        run: List[str] = []
        for raw in list(document) + [""]:  # the empty end marker closes the last run
            spoken = speakable(raw)
            text = normalize_text(spoken)
            if not (spoken and _is_clean(text)):
                if len(run) > 1:
                    runs[tuple(run)] = None
                run = []
                continue
            run.append(text)
            if text not in best or spoken < best[text]:
                best[text] = spoken
    return Candidates(tuple(Sentence(text, best[text]) for text in sorted(best)), tuple(runs))


def restrict_to_vocabulary(candidates: Candidates, vocab_size: int) -> SentencePool:
    """Keep the sentences whose words are all among the `vocab_size` most frequent (ties broken alphabetically)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    counts = collections.Counter(w for s in candidates.sentences for w in s.text.split())
    allowed = set(sorted(counts, key=lambda w: (-counts[w], w))[:vocab_size])
    kept = tuple(s for s in candidates.sentences if all(w in allowed for w in s.text.split()))
    vocabulary = tuple(sorted({w for s in kept for w in s.text.split()}))
    return SentencePool(kept, _kept_runs(candidates.runs, kept), vocabulary, len(candidates.sentences))


def _kept_runs(runs: Iterable[Sequence[str]], kept: Sequence[Sentence]) -> Tuple[Tuple[int, ...], ...]:
    """The runs split at dropped sentences; a sentence joins only its first run, so passages never repeat one."""
    index = {s.text: i for i, s in enumerate(kept)}
    claimed = set()
    out = []
    for run in runs:
        part: List[int] = []
        for text in list(run) + [None]:
            i = index.get(text)
            if i is None or i in claimed or i in part:
                if len(part) > 1:
                    out.append(tuple(part))
                    claimed.update(part)
                part = []
                if i is None or i in claimed:
                    continue
            part.append(i)
    return tuple(out)


@functools.lru_cache(maxsize=1)  # reading the sources takes a second; the result is immutable
def source_texts() -> Tuple[Tuple[str, ...], ...]:
    """Every document of the sources (WordNet glosses' examples, fortune cookies) as its raw sentences."""
    for source in (WORDNET_DIR, FORTUNE_DIR):
        if not source.is_dir():
            raise FileNotFoundError(
                f"{source} is missing: install the Debian packages wordnet-base, fortunes and fortunes-min"
            )
    return tuple(tuple(d) for d in list(wordnet_glosses()) + list(fortune_cookies()))


@functools.lru_cache(maxsize=1)  # filtering the sources takes seconds; the result is immutable
def source_candidates() -> Candidates:
    return candidate_sentences(source_texts())


@functools.lru_cache(maxsize=1)
def source_documents() -> Tuple[Tuple[Tuple[str, str], ...], ...]:
    """Every document of the sources as its sentences, each as (normalised text, the pool's text of it or "" where
    the prose filters reject it): the word n-gram LM's text, whatever its words (see make_corpus)."""
    out = []
    for document in source_texts():
        sentences = []
        for raw in document:
            spoken = speakable(raw)
            sentences.append((normalize_text(raw), normalize_text(spoken) if spoken else ""))
        out.append(tuple(sentences))
    return tuple(out)


def load_sentence_pool(vocab_size: int = VOCAB_SIZE) -> SentencePool:
    return restrict_to_vocabulary(source_candidates(), vocab_size)
