"""Speech-LLaMA model parts: encoder, adapter, LLaMA decoder with KV cache, MTP heads."""
