"""torch.compile integration: the FX pass that puts a KIVI cache under attention over a
transformers static cache, and the backend that runs it before Inductor."""

from kivi_ops.passes.backend import kivi_backend, last_rewrites, make_kivi_backend
from kivi_ops.passes.rewrite_attention import PassResult, Rewrite, rewrite_static_cache_attention

__all__ = ["kivi_backend", "make_kivi_backend", "last_rewrites", "rewrite_static_cache_attention", "Rewrite",
           "PassResult"]
