"""KIVI cache state and its streaming rules; the transformers ``KIVICache`` on top of it.

``KIVIState`` and ``CacheFootprint`` need only torch; ``KIVICache``/``KIVILayer`` and the compact
static ``KIVIStaticCache`` import transformers on first use (``from kivi_ops.cache import KIVICache``).
"""

from kivi_ops.cache.footprint import CacheFootprint
from kivi_ops.cache.state import KIVIState, fill_pad_keys

__all__ = ["CacheFootprint", "KIVIState", "fill_pad_keys", "KIVICache", "KIVILayer", "KIVIStaticCache"]


def __getattr__(name):
    if name in ("KIVICache", "KIVILayer"):
        from kivi_ops.cache import transformers_cache

        return getattr(transformers_cache, name)
    if name == "KIVIStaticCache":
        from kivi_ops.cache import transformers_static

        return transformers_static.KIVIStaticCache
    raise AttributeError(f"module 'kivi_ops.cache' has no attribute {name!r}")
