"""torch.compile integration: the FX pass that puts a KIVI cache under attention over a
transformers static cache, the one that fuses dequantize -> attention over a KIVI cache, and the
backend that runs them before Inductor."""

from kivi_ops.passes.backend import kivi_backend, last_rewrites, make_kivi_backend
from kivi_ops.passes.rewrite_attention import PassResult, Rewrite, rewrite_static_cache_attention
from kivi_ops.passes.rewrite_dequant_attention import DequantRewrite, rewrite_dequant_attention

__all__ = ["kivi_backend", "make_kivi_backend", "last_rewrites", "rewrite_static_cache_attention", "Rewrite",
           "PassResult", "rewrite_dequant_attention", "DequantRewrite"]
