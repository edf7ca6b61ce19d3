"""``kivi_backend``: a torch.compile backend = kivi's FX pass + Inductor.

    model = torch.compile(model, backend=kivi_ops.kivi_backend)                 # KIVIConfig()
    model = torch.compile(model, backend=kivi_ops.make_kivi_backend(KIVIConfig(residual_length=64)),
                          mode="reduce-overhead", fullgraph=True)

Each captured graph goes through ``rewrite_static_cache_attention`` (attention over a
transformers static cache -> KIVI static-cache ops, the cache buffers reinterpreted as KIVI
state) and ``rewrite_dequant_attention`` (single-token SDPA over a dequantized KIVI cache -> the
fused ``kivi::decode_attention``), then to ``torch._inductor.compile_fx.compile_fx`` with the Inductor options that
``mode=`` / ``options=`` ask for. Graphs without such attention go to Inductor unchanged; a graph
the pass cannot handle goes to Inductor unchanged with a warning saying why.

Compile every forward that touches the cache with this backend (prefill AND decode): the KIVI
state lives in the cache buffers, so a forward run eagerly (or compiled by another backend) would
write full-precision keys into them. The backend refuses (RuntimeError) to compile a graph it
cannot rewrite whose cache buffers an earlier rewritten graph turned into KIVI state.
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from kivi_ops.passes import rewrite_attention
from kivi_ops.passes.rewrite_dequant_attention import rewrite_dequant_attention

log = logging.getLogger("kivi_ops.passes")

_LAST: list = []
# Storages that a rewritten graph uses as KIVI stores (buffers that are graph inputs), held by weak
# reference to the storage itself: a freed cache's address, reused by a new full-precision buffer,
# must not count as KIVI state (keyed by data pointer it did, and the backend refused that buffer).
_KIVI_STORES: set = set()  # of StorageWeakRef


def last_rewrites() -> list:
    """The rewrites (``Rewrite`` records, one per attention layer) of the last graph compiled by a
    kivi backend; empty if it had none or fell back."""
    return list(_LAST)


def _config(config):
    if config is None:
        from kivi_ops.config import KIVIConfig

        config = KIVIConfig()
    return config


def _input_buffers(gm, example_inputs, names) -> list:
    """The real tensors passed for the placeholders named in ``names`` (cache buffers)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [value for node, value in zip(placeholders, example_inputs)
            if node.name in names and isinstance(value, torch.Tensor)
            and not isinstance(value, torch._subclasses.FakeTensor)]


def _mark_kivi_stores(buffers) -> None:
    """Record ``buffers``' storages as KIVI state (and forget the storages that were freed)."""
    _KIVI_STORES.difference_update([ref for ref in _KIVI_STORES if ref.expired()])
    _KIVI_STORES.update(StorageWeakRef(t.untyped_storage()) for t in buffers)


def _hold_kivi_state(buffers) -> bool:
    """Whether any of ``buffers`` shares a live storage that a rewritten graph made KIVI state."""
    for t in buffers:
        ref = StorageWeakRef(t.untyped_storage())
        if ref in _KIVI_STORES and not ref.expired():
            return True
    return False


def make_kivi_backend(config=None):
    """A torch.compile backend that applies KIVI with ``config`` (default ``KIVIConfig()``)."""
    config = _config(config)

    def kivi_backend(gm: torch.fx.GraphModule, example_inputs, mode: Optional[str] = None,
                     options: Optional[dict] = None, **kwargs):
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        cache_inputs = {n.args[0].name for n in gm.graph.nodes
                        if rewrite_attention._is_index_copy_(n) and isinstance(n.args[0], torch.fx.Node)
                        and n.args[0].op == "placeholder"}
        result = rewrite_attention.rewrite_static_cache_attention(gm, config)
        fused = rewrite_dequant_attention(gm)  # independent of the static cache: a pure optimisation
        _LAST[:] = result.rewrites + fused
        if fused:
            log.info("kivi_backend: fused %d dequantize->attention pattern(s) into kivi::decode_attention: %s",
                     len(fused), "; ".join(map(str, fused)))
        buffers = _input_buffers(gm, example_inputs, cache_inputs)
        if result.fallback_reason is not None:
            if _hold_kivi_state(buffers):
                raise RuntimeError(f"kivi_backend: cannot rewrite this graph ({result.fallback_reason}), but its cache "
                                   "buffers hold KIVI state written by an earlier compiled graph; plain Inductor "
                                   "would read them as full-precision keys and values")
            warnings.warn(f"kivi_backend: attention left to plain Inductor (no KIVI cache): {result.fallback_reason}",
                          stacklevel=2)
        elif result.rewrites:
            _mark_kivi_stores(buffers)
            log.info("kivi_backend: rewrote %d attention layer(s) onto KIVI static-cache ops (%s): %s",
                     len(result.rewrites), getattr(config, "name", config), "; ".join(map(str, result.rewrites)))
        patches = dict(list_mode_options(mode)) if mode else {}
        patches.update(options or {})
        return compile_fx(gm, example_inputs, config_patches=patches or None)

    kivi_backend.config = config
    return kivi_backend


def kivi_backend(gm, example_inputs, **kwargs):
    """``torch.compile(model, backend=kivi_backend)``: KIVI with the default ``KIVIConfig()``."""
    return _default()(gm, example_inputs, **kwargs)


_DEFAULT = []


def _default():
    if not _DEFAULT:
        _DEFAULT.append(make_kivi_backend())
    return _DEFAULT[0]
