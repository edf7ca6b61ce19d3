"""Evaluation inputs made offline: real English text (CPython's ``pydoc_data.topics``) and
passkey-retrieval prompts built here."""

from __future__ import annotations

import random

import torch


def real_text() -> str:
    """Python's reference-manual topics (real English prose with some code), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def text_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of ``real_text()`` -> [1, n_tokens] (no BOS/template)."""
    ids = tokenizer(real_text(), return_tensors="pt", add_special_tokens=False)["input_ids"][:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise ValueError(f"the text has only {ids.shape[1]} tokens, {n_tokens} requested")
    return ids


_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the pass key.\n\n")
_QUESTION = "\n\nWhat is the pass key? The pass key is"


def passkey_prompt(tokenizer, n_tokens: int, depth: float, seed: int = 0) -> tuple[torch.Tensor, str]:
    """A passkey-retrieval prompt of about ``n_tokens`` tokens with the key at relative ``depth``.

    Returns (input_ids [1, ~n_tokens], the 5-digit key). Filler repeats a fixed sentence block (the
    usual long-context retrieval test, Mohtashami & Jaggi 2023).
    """
    key = f"{random.Random(seed).randint(10000, 99999)}"
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(tokenizer(_INTRO + needle + _QUESTION, add_special_tokens=False)["input_ids"])
    per_block = len(tokenizer(_FILLER, add_special_tokens=False)["input_ids"])
    blocks = max(1, (n_tokens - fixed) // per_block)
    before = int(round(blocks * depth))
    text = _INTRO + _FILLER * before + needle + _FILLER * (blocks - before) + _QUESTION
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"], key
