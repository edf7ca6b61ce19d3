"""The transformers side of KIVI: the ``"kivi"`` attention function and the model hooks.

Mechanism (one small module, so the rest of kivi_ops never touches transformers' internals):

- ``register()`` adds ``"kivi"`` to transformers' ``AttentionInterface`` (the attention function
  below) and ``AttentionMaskInterface`` (the sdpa mask: its fallback is sdpa).
- ``attach(model)`` switches the model to ``"kivi"`` attention and installs a forward pre-hook on
  the model that, when the call carries a ``KIVICache``, hands it the 2-D attention mask (so pad
  tokens never enter key groups) and turns its fused path on; a post-hook (always called) turns
  it off again.
- During a forward, ``KIVICache.update`` of a single-token decode step in an unpadded batch stores
  the token and leaves a hand-off (layer index, layer) instead of dequantizing; the attention
  function, which transformers calls right after ``update`` in the same attention module, takes it
  and runs ``kivi_ops.ops.decode_attention`` on the packed state (fused: scores never reach
  memory). Every other call (prefill, padded batches, M > 1 queries, sliding windows past their
  length, softcapping, dropout) goes to sdpa over the keys/values ``update`` returned.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch

ATTN_NAME = "kivi"
_registered = False


def cache_kwarg_name(model) -> str:
    """The forward kwarg that carries the cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def kivi_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                           scaling: Optional[float] = None, **kwargs):
    """transformers attention function: query [B, Hq, M, D] -> (out [B, M, Hq, Dv], None).

    Fused KIVI decode attention when the cache left a hand-off for this module's layer, else sdpa.
    """
    from kivi_ops.cache.transformers_cache import take_fused_handoff
    from kivi_ops.cache.transformers_static import take_static_step

    plain = dropout == 0.0 and kwargs.get("softcap") is None and kwargs.get("s_aux") is None
    step = take_static_step(getattr(module, "layer_idx", None))
    if step is not None:  # KIVIStaticCache: key/value are its compact stores; attend on them
        if not plain:
            raise NotImplementedError("KIVIStaticCache: attention with dropout, softcapping or sinks is not supported")
        static_layer, k_new, v_new, pos = step
        causal = attention_mask is None and query.shape[2] > 1 and getattr(module, "is_causal", True)
        out = static_layer.attend(query, k_new, v_new, pos, attention_mask, causal, scaling)  # [B, Hq, M, D]
        return out.transpose(1, 2).contiguous(), None
    layer = take_fused_handoff(getattr(module, "layer_idx", None))
    if layer is not None and plain and query.shape[2] == 1:
        out = layer.state.attend(query, scale=scaling)  # [B, Hq, 1, Dv]
        return out.transpose(1, 2).contiguous(), None
    if layer is not None:
        # update() returned only the new token; rebuild the dense view for the fallback.
        key, value = layer.state.dequantized()
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register() -> None:
    """Register the ``"kivi"`` attention and mask functions with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, kivi_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    _registered = True


def _find_cache(kwargs: dict):
    from kivi_ops.cache.transformers_cache import KIVICache
    from kivi_ops.cache.transformers_static import KIVIStaticCache

    for name in ("cache", "past_key_values"):
        c = kwargs.get(name)
        if isinstance(c, (KIVICache, KIVIStaticCache)):
            return c
    return None


def _params(sig: inspect.Signature) -> tuple[inspect.Signature, Optional[str]]:
    """``sig`` and the name of its ``**kwargs`` parameter (None without one)."""
    var_kw = next((n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    return sig, var_kw


@functools.lru_cache(maxsize=64)
def _method_signature(fn) -> tuple[inspect.Signature, Optional[str]]:
    """A model class's ``forward`` function: its signature without ``self``, and its ``**kwargs``
    name. Cached per function (not per bound method, which would keep the model alive): computing
    it takes ~30 us, and each decode step called with a positional argument paid that twice."""
    sig = inspect.signature(fn)
    return _params(sig.replace(parameters=list(sig.parameters.values())[1:]))


def _call_kwargs(module, args, kwargs) -> Optional[dict]:
    """A model call's arguments by name (generate always passes keywords), or None if they do not bind."""
    if not args:
        return kwargs
    forward = module.forward
    fn = getattr(forward, "__func__", None)
    try:
        # a forward set on the instance (not a method) is rare: its signature is not cached
        sig, var_kw = _method_signature(fn) if fn is not None else _params(inspect.signature(forward))
        bound = dict(sig.bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return None
    # keywords that land in forward's **kwargs (e.g. past_key_values where the parameter is now `cache`)
    if var_kw is not None:
        bound.update(bound.pop(var_kw, {}))
    return bound


def _pre_hook(module, args, kwargs):
    kwargs = _call_kwargs(module, args, kwargs)
    cache = _find_cache(kwargs) if kwargs is not None else None
    if cache is not None:
        fused = getattr(module.config, "_attn_implementation", None) == ATTN_NAME
        cache.begin_forward(kwargs.get("attention_mask"), fused=fused,
                            model_kivi_config=getattr(module, "_kivi_config", None))
    return None


def _post_hook(module, args, kwargs, output):
    kwargs = _call_kwargs(module, args, kwargs)
    cache = _find_cache(kwargs) if kwargs is not None else None
    if cache is not None:
        cache.end_forward()
    return None


def attach(model, fused: bool = True) -> None:
    """Make ``model`` KIVI-aware (idempotent): padding masks reach a ``KIVICache``; ``fused`` also
    switches the attention implementation to ``"kivi"`` (fused decode; sdpa otherwise)."""
    if getattr(model, "_kivi_hooks", None) is None:
        model._kivi_hooks = (
            model.register_forward_pre_hook(_pre_hook, with_kwargs=True),
            model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True),
        )
    if fused and getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        register()
        model._kivi_previous_attn = model.config._attn_implementation
        model.set_attn_implementation(ATTN_NAME)


def detach(model) -> None:
    """Undo ``attach``: remove the hooks and restore the previous attention implementation."""
    for h in getattr(model, "_kivi_hooks", None) or ():
        h.remove()
    model._kivi_hooks = None
    previous = getattr(model, "_kivi_previous_attn", None)
    if previous is not None:
        model.set_attn_implementation(previous)
        model._kivi_previous_attn = None
