"""The one text normaliser: every corpus preparation and the scorer use it, so references and hypotheses agree."""
import re
import unicodedata

_KEEP = re.compile(r"[^A-Z0-9' ]+")
# Latin letters that Unicode does not decompose into a base letter and an accent (NFKD leaves them whole).
_LETTERS = str.maketrans({"Ø": "O", "ø": "o", "Æ": "AE", "æ": "ae", "Œ": "OE", "œ": "oe", "Ł": "L", "ł": "l",
                          "Đ": "D", "đ": "d", "Þ": "TH", "þ": "th", "ı": "i", "ß": "ss"})
_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Upper-case words of A-Z, digits and inner apostrophes, separated by single spaces.

    Accents are dropped (CAFÉ -> CAFE, SØREN -> SOREN), typographic apostrophes become ', every other symbol
    (punctuation, hyphens) becomes a word break, and apostrophes that only quote (at a word's edge) are removed.
    """
    text = unicodedata.normalize("NFKD", text.translate(_LETTERS))
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'").upper()
    text = _KEEP.sub(" ", text)
    words = (w.strip("'") for w in _SPACES.split(text))
    return " ".join(w for w in words if w)
