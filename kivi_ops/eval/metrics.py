"""The three fidelity measurements, each against one cache built by a ``Scheme``.

- ``streaming_scores``: perplexity on real text decoded token by token after a short prefill, so
  every scored token attends to the (quantized) history; also the argmax of every step, for the
  next-token agreement with the full-precision cache.
- ``passkey``: greedy answer to a long passkey prompt; the prefill is shared by all schemes (it
  attends in full precision whatever the cache), each scheme's cache is then filled with the
  prefill's keys/values exactly as its own prefill would, and the answer is decoded through it.
"""

from __future__ import annotations

import math

import torch

from kivi_ops.integrations.transformers import cache_kwarg_name


def _forward(model, ids, cache):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=cache is not None,
                     **({cache_kwarg_name(model): cache} if cache is not None else {})).logits


def dense_scores(model, ids: torch.Tensor, prefix: int):
    """Full-precision reference in one forward (what a full-precision cache gives, step by step).

    ids [W, N] (W independent text windows) -> (nll [W * (N - prefix)] of tokens prefix..N-1 of
    every window, argmax [W * (N - prefix)] predicting them).
    """
    logits = _forward(model, ids, None)[:, prefix - 1:-1].float()
    return _score(logits, ids[:, prefix:])


def _score(logits: torch.Tensor, target: torch.Tensor):
    """logits [W, n, V], target [W, n] -> (nll [W * n], argmax [W * n])."""
    logits = logits.reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(logits, target.reshape(-1), reduction="none"), logits.argmax(-1)


def streaming_scores(model, ids: torch.Tensor, prefix: int, cache, progress=None):
    """Prefill ``prefix`` tokens into ``cache``, then decode ids[prefix:] one token at a time.

    ids [W, N] -> (nll [W * (N - prefix)], argmax [W * (N - prefix)]) of the predictions of tokens
    prefix..N-1 of every window (same order as ``dense_scores``).
    """
    rows = [_forward(model, ids[:, :prefix], cache)[:, -1:].float()]
    for i in range(prefix, ids.shape[1] - 1):
        rows.append(_forward(model, ids[:, i:i + 1], cache)[:, -1:].float())
        if progress is not None:
            progress.update(1)
    return _score(torch.cat(rows, 1), ids[:, prefix:])


def perplexity(nll: torch.Tensor) -> float:
    return math.exp(nll.double().mean().item())


def prefill_states(model, ids: torch.Tensor):
    """One full-precision prefill -> (DynamicCache holding its keys/values, next-token logits [V])."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    logits = _forward(model, ids, cache)[0, -1]
    return cache, logits


def fill_like_prefill(cache, dense) -> None:
    """Feed a full-precision prefill's per-layer keys/values into ``cache`` (what its own prefill stores)."""
    for i, layer in enumerate(dense.layers):
        cache.update(layer.keys, layer.values, i)


def greedy_continue(model, cache, first_logits: torch.Tensor, steps: int) -> list[int]:
    """Greedy decode ``steps`` tokens through ``cache`` starting from the prefill's logits."""
    tokens = [int(first_logits.argmax())]
    for _ in range(steps - 1):
        nxt = torch.tensor([[tokens[-1]]], device=first_logits.device)
        tokens.append(int(_forward(model, nxt, cache)[0, -1].argmax()))
    return tokens
