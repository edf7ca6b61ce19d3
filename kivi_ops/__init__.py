"""kivi_ops: KIVI 2/4-bit KV-cache quantization for PyTorch and Hugging Face transformers.

Keys are quantized per channel, values per token, the newest tokens stay in full precision
(arXiv 2402.02750).

- ``kivi_ops.ops``: the torch.library ops (``kivi::*``) and their Python entry points;
- ``KIVIConfig``, ``KIVICache``, ``quantize_``: the cache for transformers' ``generate``;
- ``kivi_backend`` / ``make_kivi_backend``: ``torch.compile`` backend rewriting static-cache
  attention onto the KIVI static-cache ops; ``StaticKIVICache``;
- ``kivi_ops.export``: the decode step exported with torch.export and packaged with AOTInductor.
"""

from kivi_ops import ops
from kivi_ops.cache.footprint import CacheFootprint
from kivi_ops.cache.static import StaticKIVICache
from kivi_ops.config import KIVIConfig
from kivi_ops.passes import kivi_backend, last_rewrites, make_kivi_backend
from kivi_ops.quantize import quantize_, unquantize_  # registers KIVIConfig with torchao if installed

__all__ = [
    "ops", "KIVIConfig", "KIVICache", "KIVILayer", "CacheFootprint", "quantize_", "unquantize_",
    "kivi_backend", "make_kivi_backend", "last_rewrites", "StaticKIVICache",
]
__version__ = "0.1.0"


def __getattr__(name):  # transformers is an optional extra: import it only when asked for
    if name in ("KIVICache", "KIVILayer"):
        from kivi_ops.cache import transformers_cache

        return getattr(transformers_cache, name)
    raise AttributeError(f"module 'kivi_ops' has no attribute {name!r}")
