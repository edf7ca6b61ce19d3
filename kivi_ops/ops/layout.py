"""The packed KIVI layout, written down once, and the checks every implementation shares.

Shapes use ``B`` batch, ``H`` KV heads, ``T`` tokens, ``D`` head_dim, ``G`` group_size,
``P = 8 // bits`` codes per byte.

Keys (per-channel groups: ``G`` consecutive tokens of one channel)::

    k      [B, H, T, D]        float16 | bfloat16 | float32, T % G == 0
    codes  [B, H, T // P, D]   uint8   byte (r, d) holds tokens r*P + j, j = 0..P-1, of channel d;
                                        token r*P + j sits in bits [j*bits, (j+1)*bits) (LSB first)
    scale  [B, H, T // G, D]   k.dtype  group (g, d) covers tokens g*G .. g*G+G-1 of channel d
    zero   [B, H, T // G, D]   k.dtype

Values (per-token groups: ``G`` consecutive channels of one token)::

    v      [B, H, T, D]        D % G == 0, any T
    codes  [B, H, T, D // P]   uint8   byte (t, c) holds channels c*P + j of token t at bits [j*bits, ...)
    scale  [B, H, T, D // G]   v.dtype  group (t, g) covers channels g*G .. g*G+G-1 of token t
    zero   [B, H, T, D // G]   v.dtype

Why this layout: a block of tokens is one contiguous run of bytes in both tensors (``D`` bytes
per key row of P tokens, ``D/P`` bytes per value token), so the decode kernels load it with
16-byte vector loads and no transpose; appending tokens appends rows (dim 2) for keys and values
alike, which a static cache needs. Codes take exactly ``bits / 8`` bytes per element.

Numerics (identical in every implementation, so codes match bit for bit)::

    lo, hi = min(group), max(group)                    in float32
    scale  = round_up((hi - lo) / (2**bits - 1), dtype)  zero = lo.to(dtype)   (lo is exact)
             round_up: round to nearest, then one step up if that fell below the float32 value, so
             the stored scale never undershoots and the top code never clamps (|x - x_hat| <= s/2)
    code   = clamp(floor((x - zero) / scale + 0.5), 0, 2**bits - 1)   IEEE division, float32
             with code = 0 where scale == 0 (an all-equal group dequantizes exactly to zero)
    x_hat  = code * scale + zero                       in float32, then cast

A group that holds NaN or +-Inf (or whose range overflows float32) gets scale = zero = NaN and
codes 0: it dequantizes to NaN, and no other group is affected.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4, 8)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def codes_per_byte(bits: int) -> int:
    return 8 // bits


def check_bits_group(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 8 != 0:
        raise ValueError(f"group_size must be a positive multiple of 8 (e.g. 32, 64, 128), got {group_size}")


def check_float_4d(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [batch, kv_heads, tokens, head_dim], got shape {tuple(x.shape)}")


def check_keys_input(k: torch.Tensor, bits: int, group_size: int) -> None:
    check_bits_group(bits, group_size)
    check_float_4d("k", k)
    if k.shape[2] % group_size != 0:
        raise ValueError(
            f"k: the token count ({k.shape[2]}) must be a multiple of group_size ({group_size}); "
            "keep the remainder in the full-precision residual"
        )


def check_values_input(v: torch.Tensor, bits: int, group_size: int) -> None:
    check_bits_group(bits, group_size)
    check_float_4d("v", v)
    if v.shape[3] % group_size != 0:
        raise ValueError(f"v: head_dim ({v.shape[3]}) must be a multiple of group_size ({group_size})")


def _check_packed_common(codes, scale, zero, bits, group_size):
    check_bits_group(bits, group_size)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError(f"codes must be a uint8 tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
    if codes.dim() != 4:
        raise ValueError(f"codes must be 4-D, got shape {tuple(codes.shape)}")
    for name, t in (("scale", scale), ("zero", zero)):
        if not isinstance(t, torch.Tensor) or t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be a float16/bfloat16/float32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.device != codes.device:
            raise ValueError(f"{name} is on {t.device} but codes is on {codes.device}")
    if scale.dtype != zero.dtype:
        raise TypeError(f"scale ({scale.dtype}) and zero ({zero.dtype}) must have the same dtype")
    if scale.shape != zero.shape:
        raise ValueError(f"scale {tuple(scale.shape)} and zero {tuple(zero.shape)} must have the same shape")


def check_packed_keys(codes, scale, zero, bits: int, group_size: int) -> tuple[int, int, int, int]:
    """Validate a packed-keys triple; returns the unpacked shape (B, H, T, D)."""
    _check_packed_common(codes, scale, zero, bits, group_size)
    B, H, rows, D = codes.shape
    T = rows * codes_per_byte(bits)
    expected = (B, H, T // group_size, D)
    if T % group_size != 0 or tuple(scale.shape) != expected:
        raise ValueError(
            f"packed keys: codes {tuple(codes.shape)} at {bits} bits hold {T} tokens, so scale and zero must be "
            f"{expected} for group_size {group_size}; got {tuple(scale.shape)}"
        )
    return B, H, T, D


def check_packed_values(codes, scale, zero, bits: int, group_size: int) -> tuple[int, int, int, int]:
    """Validate a packed-values triple; returns the unpacked shape (B, H, T, D)."""
    _check_packed_common(codes, scale, zero, bits, group_size)
    B, H, T, cols = codes.shape
    D = cols * codes_per_byte(bits)
    expected = (B, H, T, D // group_size)
    if D % group_size != 0 or tuple(scale.shape) != expected:
        raise ValueError(
            f"packed values: codes {tuple(codes.shape)} at {bits} bits hold head_dim {D}, so scale and zero must be "
            f"{expected} for group_size {group_size}; got {tuple(scale.shape)}"
        )
    return B, H, T, D


def check_query(name: str, q: torch.Tensor, kv_shape: tuple[int, int, int, int], last_dim: int, last_name: str) -> None:
    """q [B, Hq, M, last_dim] against a KV cache of shape (B, Hkv, T, D); Hq a multiple of Hkv."""
    check_float_4d(name, q)
    B, Hkv = kv_shape[0], kv_shape[1]
    if q.shape[0] != B:
        raise ValueError(f"{name}: batch {q.shape[0]} does not match the cache's batch {B}")
    if q.shape[1] % Hkv != 0:
        raise ValueError(f"{name}: query heads ({q.shape[1]}) must be a multiple of the KV heads ({Hkv})")
    if q.shape[3] != last_dim:
        raise ValueError(f"{name}: last dimension must be {last_name} = {last_dim}, got {q.shape[3]}")
