"""The one text normaliser: every corpus preparation and the scorer use it, so references and hypotheses agree."""
import re
import unicodedata

_KEEP = re.compile(r"[^A-Z0-9' ]+")
_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Upper-case words of A-Z, digits and inner apostrophes, separated by single spaces.

    Accents are dropped (CAFÉ -> CAFE), typographic apostrophes become ', every other symbol (punctuation, hyphens)
    becomes a word break, and apostrophes that only quote (at a word's edge) are removed.
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'").upper()
    text = _KEEP.sub(" ", text)
    words = (w.strip("'") for w in _SPACES.split(text))
    return " ".join(w for w in words if w)
