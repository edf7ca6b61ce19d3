"""The caches compared by the demo and the evaluation, built by name, and their byte counts.

Schemes: ``fp`` (transformers' DynamicCache), ``kivi2``/``kivi4`` (``KIVICache``, G=32 R=128 by
default), ``hf2``/``hf4`` (transformers' own ``QuantizedCache`` with optimum-quanto or HQQ,
whichever is installed: the baseline; same G, R, its keys per channel and values per channel
too, as transformers does).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from kivi_ops.config import KIVIConfig


@dataclass(frozen=True)
class Scheme:
    key: str
    label: str
    make: Callable  # (model config) -> Cache
    available: bool = True
    why_unavailable: str = ""


def hf_quantized_backend() -> Optional[str]:
    """``"quanto"`` or ``"hqq"`` if transformers' QuantizedCache can use one here, else None."""
    if importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None:
        return "quanto"
    if importlib.util.find_spec("hqq") is not None:
        return "hqq"
    return None


def schemes(group_size: int = 32, residual_length: int = 128, include_baseline: bool = True) -> list[Scheme]:
    from transformers import DynamicCache

    from kivi_ops.cache.transformers_cache import KIVICache

    out = [Scheme("fp", "full precision", lambda cfg: DynamicCache(config=cfg))]
    for bits in (2, 4):
        kc = KIVIConfig(k_bits=bits, v_bits=bits, group_size=group_size, residual_length=residual_length)
        out.append(Scheme(f"kivi{bits}", f"KIVI-{bits}", lambda cfg, kc=kc: KIVICache(kc, config=cfg)))
    if include_baseline:
        backend = hf_quantized_backend()
        for bits in (2, 4):
            if backend is None:
                out.append(Scheme(f"hf{bits}", f"HF QuantizedCache {bits}-bit", None, False,
                                  "neither optimum-quanto nor hqq is installed"))
                continue

            def make(cfg, bits=bits, backend=backend):
                from transformers import QuantizedCache

                return QuantizedCache(backend, cfg, nbits=bits, q_group_size=group_size,
                                      residual_length=residual_length)

            out.append(Scheme(f"hf{bits}", f"HF QuantizedCache {bits}-bit ({backend})", make))
    return out


def cache_bytes(cache) -> tuple[int, int]:
    """(bytes the cache holds, bytes of the same tokens in dense fp16) for DynamicCache / KIVICache."""
    from kivi_ops.cache.transformers_cache import KIVICache

    if isinstance(cache, KIVICache):
        fp = cache.memory_footprint()
        return fp.total_bytes, fp.fp16_bytes
    held = fp16 = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                held += t.numel() * t.element_size()
                fp16 += t.numel() * 2
    return held, fp16
