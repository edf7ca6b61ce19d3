"""Fidelity evaluation of KIVI caches on SmolLM2: streaming perplexity, passkey retrieval and
next-token agreement with the full-precision cache (``python -m kivi_ops eval``)."""
