"""kivi_ops: KIVI 2/4-bit KV-cache quantization for PyTorch and Hugging Face transformers.

Keys are quantized per channel, values per token, the newest tokens stay in full precision
(arXiv 2402.02750). ``kivi_ops.ops`` holds the torch.library ops (``kivi::*``).
"""

from kivi_ops import ops

__all__ = ["ops"]
__version__ = "0.1.0"
