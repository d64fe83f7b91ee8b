"""The synthetic demo corpus: real English sentences spoken by offline TTS engines (see make_corpus.py).

The modules import each other by plain name (make_corpus.py puts this folder on sys.path), so that the recipe
can run make_corpus.py as a script and the CLI can load it by file path; their synth_ prefix avoids clashes.
"""
