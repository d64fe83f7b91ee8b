"""mtp_asr: Speech-LLaMA speech recognition with fast multi-token-prediction decoding."""

__version__ = "0.1.0"
