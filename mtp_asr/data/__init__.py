"""Data preparation: corpus -> Lhotse CutSets (prepare, synth), fbank features (fbank), sentencepiece (tokenizer)."""


class PreparationError(RuntimeError):
    """A preparation that cannot produce a usable output (bad input layout, or nothing survived the checks)."""
