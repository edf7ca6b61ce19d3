"""``quantize_(model, KIVIConfig(...))``: make a transformers model generate with a KIVI cache.

torchao-style: the model is changed in place and ``model.generate(...)`` needs no other change.
What it does (all undone by ``unquantize_``):

1. checks the model can hold a KIVI cache (attention layer types, head_dim % group_size) — a
   clear ValueError now rather than a wrong cache later;
2. ``kivi_ops.integrations.transformers.attach``: padding masks reach the cache, attention runs
   through the ``"kivi"`` function (fused decode where possible, sdpa otherwise);
3. wraps this model instance's ``generate`` so a call without a cache of its own gets a fresh
   ``KIVICache`` (passed under the kwarg the installed transformers expects). Wrapping the bound
   method is the robust choice: transformers has no stable public registry for custom cache
   implementations across 5.x.

With torchao installed, ``KIVIConfig`` is also registered as a torchao config, so
``torchao.quantization.quantize_(model, KIVIConfig(), filter_fn=kivi_filter_fn)`` does the same.
"""

from __future__ import annotations

import functools
import sys

import torch

from kivi_ops.config import KIVIConfig


def _check_model(model, config: KIVIConfig) -> None:
    from kivi_ops.cache.transformers_cache import check_model_config

    if not isinstance(config, KIVIConfig):
        raise TypeError(f"config must be a KIVIConfig, got {type(config).__name__}")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config") or not hasattr(model, "generate"):
        raise ValueError(f"quantize_ needs a transformers generative model (with .config and .generate), got "
                         f"{type(model).__name__}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("KIVI caches serve decoder-only models; encoder-decoder models are not supported")
    has_attention = any(hasattr(m, "layer_idx") and hasattr(m, "head_dim") for m in model.modules())
    if not has_attention:
        raise ValueError(f"{type(model).__name__} has no attention layers KIVI recognises (modules with layer_idx "
                         "and head_dim that read a transformers Cache)")
    check_model_config(config, model.config)


def quantize_(model, config: KIVIConfig | None = None):
    """Give ``model`` a KIVI KV cache for ``generate`` (in place; returns the model).

    Calling it again replaces the config. ``generate`` calls that pass their own cache (or a
    ``cache_implementation``) are left alone.
    """
    from kivi_ops.integrations import transformers as kt

    config = KIVIConfig() if config is None else config
    _check_model(model, config)
    kt.attach(model)
    model._kivi_config = config
    if getattr(model, "_kivi_original_generate", None) is None:
        original = model.generate
        model._kivi_original_generate = original

        @functools.wraps(original)
        def generate(*args, **kwargs):
            from kivi_ops.cache.transformers_cache import KIVICache

            gen_cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)
            wants_own = (
                any(kwargs.get(k) is not None for k in ("cache", "past_key_values", "cache_implementation"))
                or kwargs.get("use_cache") is False
                or getattr(gen_cfg, "cache_implementation", None) is not None
                or getattr(gen_cfg, "use_cache", True) is False
            )
            if not wants_own:
                kwargs[kt.cache_kwarg_name(model)] = KIVICache(model._kivi_config, config=model.config)
            return original(*args, **kwargs)

        model.generate = generate
    return model


def unquantize_(model):
    """Undo ``quantize_``: the original ``generate``, attention implementation and no hooks."""
    from kivi_ops.integrations import transformers as kt

    original = getattr(model, "_kivi_original_generate", None)
    if original is not None:
        del model.generate  # the instance attribute; the class method shows through again
        model._kivi_original_generate = None
    kt.detach(model)
    model._kivi_config = None
    return model


def kivi_filter_fn(module: torch.nn.Module, fqn: str) -> bool:
    """``filter_fn`` for torchao's ``quantize_``: select the whole model (KIVI acts on its cache)."""
    return fqn == "" and hasattr(module, "generate") and hasattr(module, "config")


_registered_with_torchao = False


def register_torchao() -> bool:
    """Register ``KIVIConfig`` with torchao's ``quantize_`` if torchao is installed; returns whether it is.

    Runs by itself when kivi_ops is imported after torchao, or when a ``KIVIConfig`` is made while
    torchao is imported; call it directly for any other order."""
    global _registered_with_torchao
    if _registered_with_torchao:
        return True
    try:
        from torchao.core.config import AOBaseConfig
        from torchao.quantization.transform_module import register_quantize_module_handler
    except Exception:  # torchao missing or broken: kivi_ops works without it
        return False
    AOBaseConfig.register(KIVIConfig)  # virtual subclass: isinstance(cfg, AOBaseConfig) holds

    @register_quantize_module_handler(KIVIConfig)
    def _kivi_handler(module: torch.nn.Module, config: KIVIConfig) -> torch.nn.Module:
        if not (hasattr(module, "generate") and hasattr(module, "config")):
            raise ValueError(
                "KIVIConfig quantizes a model's KV cache, not its layers: call torchao.quantization.quantize_(model, "
                "KIVIConfig(), filter_fn=kivi_ops.quantize.kivi_filter_fn) so the whole model is selected")
        return quantize_(module, config)

    _registered_with_torchao = True
    return True


# torchao's quantize_ looks the handler up by type, so it must be registered before the user calls
# it. Importing torchao ourselves would cost every user ~1.5 s and torchao's load-time warnings, so
# register only if the user already imported it (else KIVIConfig.__post_init__ does it).
if "torchao" in sys.modules:
    register_torchao()
