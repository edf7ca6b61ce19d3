"""``StaticKIVICache``: a KIVI cache in buffers preallocated for a maximum batch and length.

gpt-fast style: every tensor has a fixed shape and address for the life of the cache, the token
count lives on the device, and the only writes are the in-place ``kivi::static_kv_append_`` op,
so a compiled decode step has static shapes, no host sync, and can be captured in a CUDA graph
(``torch.compile(mode="reduce-overhead")``).

Per layer, two stores ``[B, H, L, Ds]`` in the cache dtype hold the KIVI state (codes, scales,
zeros, full-precision residual ring; layout in ``csrc/static_cache.cpp``). By default a store is
compact: Ds is just enough for the state (``static_ops.compact_store_shape``; e.g. 29 of 128 at
2 bits and 45 of 128 at 4 bits for L = 4096, R = 128, G = 32), so the cache takes ~4.4x / ~2.8x less
memory than fp16 buffers.
``compact=False`` gives full-width stores (Ds = D), the shape of a transformers ``StaticCache``
buffer, which is what the FX pass of ``kivi_ops.passes`` reinterprets. Streaming rules and logits are
those of the dynamic ``KIVICache`` (DESIGN §1): a prefill into an empty cache attends in full
precision; afterwards attention reads the state after the append (keys quantized in blocks of R,
all but the newest R values quantized).

Use::

    cache = StaticKIVICache(num_layers, batch, kv_heads, max_len, head_dim, config, dtype=..., device=...)
    pos = cache.positions(M)                       # int64 [M] = length .. length+M-1, on the device
    out = cache.attend(layer, q, k, v, pos)        # appends k, v, then attends: [B, Hq, M, D]
    cache.advance_(M)                              # once per forward, after the last layer

Not handled (yet): padded batches (pad keys would enter key groups' min/max; the dynamic
``KIVICache`` excludes them), per-sequence lengths.
"""

from __future__ import annotations

from typing import Optional

import torch

from kivi_ops.cache import static_ops


def _default_config():
    from kivi_ops.config import KIVIConfig

    return KIVIConfig()


class StaticKIVICache(torch.nn.Module):
    """Preallocated KIVI cache for ``num_layers`` attention layers (see the module docstring).

    Buffers (registered, so ``.to()``, ``state_dict`` and ``torch.export`` see them):
    ``k_store_{i}``, ``v_store_{i}`` [B, H, L, Ds] (dtype; Ds = D when ``compact=False``) and
    ``length`` int64 [1], the token count.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 config=None, dtype: torch.dtype = torch.float16, device=None, compact: bool = True):
        super().__init__()
        self.config = config if config is not None else _default_config()
        c = self.config
        es = torch.empty((), dtype=dtype).element_size()
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        if compact:
            shape = static_ops.compact_store_shape(*shape, es, c.k_bits, c.v_bits, c.group_size, c.residual_length)
        why = static_ops.store_fits(shape, es, c.k_bits, c.v_bits, c.group_size, c.residual_length, head_dim=head_dim)
        if why is not None:
            raise ValueError(f"StaticKIVICache: {why}")
        self.num_layers, self.max_len = num_layers, max_len
        for i in range(num_layers):
            self.register_buffer(f"k_store_{i}", torch.zeros(shape, dtype=dtype, device=device))
            self.register_buffer(f"v_store_{i}", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("length", torch.zeros(1, dtype=torch.long, device=device))

    def stores(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"k_store_{layer}"), getattr(self, f"v_store_{layer}")

    def positions(self, num_new: int) -> torch.Tensor:
        """int64 [num_new]: the positions of the next ``num_new`` tokens (device arithmetic, no sync)."""
        return self.length + torch.arange(num_new, device=self.length.device)

    def advance_(self, num_new: int) -> None:
        """Count ``num_new`` more tokens (in place, on the device)."""
        self.length.add_(num_new)

    def append_(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Store k, v [B, H, M, D] at positions pos (int64 [M]) in layer ``layer``'s stores."""
        c = self.config
        ks, vs = self.stores(layer)
        static_ops.static_kv_append_(ks, vs, k, v, pos, c.k_bits, c.v_bits, c.group_size, c.residual_length)

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                  attn_mask: Optional[torch.Tensor] = None, is_causal: bool = True,
                  scale: Optional[float] = None) -> torch.Tensor:
        """Attention of q [B, Hq, M, D] over layer ``layer`` after ``append_(layer, k, v, pos)``."""
        c = self.config
        ks, vs = self.stores(layer)
        return static_ops.static_kv_attention(q, ks, vs, k, v, pos, attn_mask, is_causal, c.k_bits, c.v_bits,
                                              c.group_size, c.residual_length, scale)

    def attend(self, layer: int, q, k, v, pos, attn_mask=None, is_causal: bool = True, scale=None) -> torch.Tensor:
        """``append_`` then ``attention``: one attention layer's cache step -> [B, Hq, M, D]."""
        self.append_(layer, k, v, pos)
        return self.attention(layer, q, k, v, pos, attn_mask, is_causal, scale)

    def reset_(self) -> None:
        """Forget every token (the count is what defines the contents; stores need no clearing)."""
        self.length.zero_()
