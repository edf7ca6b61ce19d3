"""Python side of the static-cache ops ``kivi::static_kv_append_`` / ``kivi::static_kv_attention``.

The schemas and the one (CompositeExplicitAutograd, ATen-only) implementation are in
``csrc/static_cache.cpp``, which also documents how a store's bytes hold KIVI state. Here: the
fake kernels (torch.compile / torch.export / AOTInductor tracing), typed wrappers, and
``store_nbytes`` (how many bytes a store needs, mirrored from the C++ so the FX pass can decide
whether a transformers buffer is big enough before it rewrites anything).

Shapes: a store is ``[B, H, L, Ds]`` of the cache dtype (L = maximum length; Ds = D for a
transformers buffer, fewer for a compact store, see ``compact_store_shape``); new tokens are
``k, v [B, H, M, D]`` at positions ``pos`` (int64 ``[M]``, consecutive ``n .. n+M-1``, on the device).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from kivi_ops import _extension


def _align16(n: int) -> int:
    return (n + 15) // 16 * 16


def store_nbytes(kind: str, B: int, H: int, L: int, D: int, element_size: int, bits: int, group_size: int,
                 residual_length: int) -> int:
    """Bytes of KIVI state a ``kind`` ("keys" or "values") store ``[B, H, L, D]`` must hold."""
    G, R = group_size, residual_length
    ring = _align16(B * H * R * D * element_size)
    if kind == "keys":
        ng = (L + G - 1) // G + 1
        return ring + 2 * _align16(B * H * ng * D * element_size) + _align16(B * H * ng * G * bits // 8 * D)
    return ring + 2 * _align16(B * H * L * (D // G) * element_size) + _align16(B * H * L * D * bits // 8)


def store_fits(shape, element_size: int, k_bits: int, v_bits: int, group_size: int, residual_length: int,
               head_dim: Optional[int] = None) -> Optional[str]:
    """None if a ``[B, H, L, Ds]`` store of ``element_size``-byte elements can hold KIVI keys and
    values state of ``head_dim`` (default Ds); otherwise the reason it cannot (for the FX pass's
    fallback warning and the caches' errors)."""
    B, H, L, D = (int(s) for s in shape)
    have = B * H * L * D * element_size
    D = D if head_dim is None else int(head_dim)
    if residual_length % group_size != 0:
        return f"residual_length ({residual_length}) must be a multiple of group_size ({group_size})"
    if D % group_size != 0:
        return f"head_dim ({D}) must be a multiple of group_size ({group_size})"
    for kind, bits in (("keys", k_bits), ("values", v_bits)):
        need = store_nbytes(kind, B, H, L, D, element_size, bits, group_size, residual_length)
        if need > have:
            return (f"a [{B}, {H}, {L}, {D}] cache buffer has {have} bytes but KIVI {kind} state needs {need} "
                    f"(max_cache_len {L} is too short for residual_length {residual_length}; use a longer cache "
                    f"or a smaller residual_length)")
    return None


def compact_store_shape(B: int, H: int, L: int, D: int, element_size: int, k_bits: int, v_bits: int,
                        group_size: int, residual_length: int) -> tuple[int, int, int, int]:
    """The smallest ``[B, H, L, Ds]`` store (Ds <= D) whose bytes hold KIVI keys or values state of
    ``L`` tokens of head_dim ``D``: what a KIVI-native cache allocates instead of a ``[B, H, L, D]``
    full-precision buffer (Ds / D is the memory it keeps: 29/128 at 2 bits, 45/128 at 4 bits for
    L = 4096, G = 32, R = 128)."""
    row = B * H * L * element_size
    need = max(store_nbytes(kind, B, H, L, D, element_size, bits, group_size, residual_length)
               for kind, bits in (("keys", k_bits), ("values", v_bits)))
    return (B, H, L, min(D, -(-need // row)))


def static_kv_append_(k_store: torch.Tensor, v_store: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      pos: torch.Tensor, k_bits: int = 2, v_bits: int = 2, group_size: int = 32,
                      residual_length: int = 128) -> None:
    """Append k, v [B, H, M, D] at positions pos (int64 [M]) to the stores, in place."""
    torch.ops.kivi.static_kv_append_(k_store, v_store, k, v, pos, k_bits, v_bits, group_size, residual_length)


def static_kv_attention(q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, pos: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                        is_causal: bool = True, k_bits: int = 2, v_bits: int = 2, group_size: int = 32,
                        residual_length: int = 128, scale: Optional[float] = None) -> torch.Tensor:
    """Attention of q [B, Hq, M, D] over the stored state AFTER ``static_kv_append_(.., k, v, pos)``.

    Same as the dynamic ``KIVICache``: the quantized part + full-precision residual as KIVI's
    streaming rule leaves them for ``pos[0] + M`` tokens, except that a prefill into an empty
    cache (``pos[0] == 0``) attends to ``k, v`` in full precision. ``attn_mask`` [B|1, Hq|1, M, L] (bool = keep, or additive float) over the L store positions;
    ``is_causal`` makes query i see positions <= pos[i]. Returns [B, Hq, M, D] in q.dtype.

    A decode step (M == 1) on CUDA runs the fused decode kernel over the stores
    (``kivi::_static_decode_attention``; fp16/bf16, 2/4 bits, head_dim 64/128, no mask or a bool
    [B|1, 1, 1, L] mask); other steps and devices use composites of the kivi ops (docs/design_notes.md).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return torch.ops.kivi.static_kv_attention(q, k_store, v_store, k, v, pos, attn_mask, is_causal, k_bits, v_bits,
                                              group_size, residual_length, scale)


def _register_fakes() -> None:
    @torch.library.register_fake("kivi::static_kv_append_")
    def _(k_store, v_store, k, v, pos, k_bits, v_bits, group_size, residual_length):
        return None

    @torch.library.register_fake("kivi::static_kv_attention")
    def _(q, k_store, v_store, k, v, pos, attn_mask, is_causal, k_bits, v_bits, group_size, residual_length, scale):
        return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))

    @torch.library.register_fake("kivi::_static_append_one_")
    def _(k_ring, k_scale, k_zero, k_codes, v_ring, v_scale, v_zero, v_codes, k, v, pos, k_bits, v_bits, group_size,
          residual_length):
        return None

    @torch.library.register_fake("kivi::_static_decode_attention")
    def _(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_ring, v_ring, end, mask_bits, k_bits, v_bits,
          group_size, residual_length, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("kivi::_mask_bits")
    def _(mask):
        return mask.new_empty((mask.shape[0], (mask.shape[1] + 31) // 32), dtype=torch.int32)


if _extension.EXTENSION_ERROR is None and hasattr(torch.ops.kivi, "static_kv_append_"):
    _register_fakes()
