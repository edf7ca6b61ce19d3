"""Pure-PyTorch reference of every KIVI op: the ground truth all kernels are tested against.

Layout and numerics: see ``kivi_ops.ops.layout``. These functions do no input validation; the
public entry points in ``kivi_ops.ops`` validate before dispatching here.
"""

from __future__ import annotations

import math

import torch


def round_up_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast float32 ``x >= 0`` to ``dtype``, one representable step up where round-to-nearest fell below."""
    y = x.to(dtype)
    if dtype == torch.float32:
        return y
    bumped = (y.view(torch.int16) + 1).view(dtype)  # next value up, for positive finite y
    return torch.where(y.float() < x, bumped, y)


def _group_stats(x: torch.Tensor, dim: int, bits: int, dtype: torch.dtype):
    """Min/max over ``dim`` of float32 ``x`` -> (scale, zero) in ``dtype``; non-finite groups -> NaN."""
    lo = x.amin(dim)  # amin/amax propagate NaN
    hi = x.amax(dim)
    # a tensor divisor: PyTorch's CUDA division by a Python scalar multiplies by its float32
    # reciprocal, one ulp off the IEEE quotient the kernels (and the CPU) compute
    scale = round_up_cast((hi - lo) / torch.full_like(hi, 2**bits - 1), dtype)
    zero = lo.to(dtype)
    bad = ~(torch.isfinite(scale) & torch.isfinite(zero))
    nan = torch.tensor(float("nan"), dtype=dtype, device=x.device)
    return torch.where(bad, nan, scale), torch.where(bad, nan, zero)


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of float32 ``x`` given broadcastable stored scale/zero (any dtype)."""
    s = scale.float()
    z = zero.float()
    ok = s > 0  # False for s == 0 and for NaN
    t = torch.where(ok, (x - z) / torch.where(ok, s, torch.ones_like(s)), torch.zeros_like(x))
    return torch.floor(t + 0.5).clamp_(0, 2**bits - 1).to(torch.uint8)


def _pack(codes: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """Pack uint8 codes along ``dim``: element i*P + j goes to byte i, bits [j*bits, (j+1)*bits)."""
    per = 8 // bits
    shape = list(codes.shape)
    shape[dim : dim + 1] = [shape[dim] // per, per]
    c = codes.reshape(shape).to(torch.int32)
    shifts = (torch.arange(per, device=codes.device, dtype=torch.int32) * bits).view(
        [per] + [1] * (len(shape) - dim - 2)
    )
    return (c << shifts).sum(dim + 1).to(torch.uint8)


def _unpack(packed: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """Inverse of ``_pack``: uint8 [.., n, ..] -> int32 codes [.., n * P, ..]."""
    per = 8 // bits
    p = packed.to(torch.int32).unsqueeze(dim + 1)
    shifts = (torch.arange(per, device=packed.device, dtype=torch.int32) * bits).view(
        [per] + [1] * (packed.dim() - dim - 1)
    )
    c = (p >> shifts) & (2**bits - 1)
    shape = list(packed.shape)
    shape[dim] *= per
    return c.reshape(shape)


def quantize_keys(k: torch.Tensor, bits: int, group_size: int):
    """k [B, H, T, D] -> codes uint8 [B, H, T*bits/8, D], scale/zero [B, H, T/G, D]."""
    B, H, T, D = k.shape
    x = k.float().reshape(B, H, T // group_size, group_size, D)
    scale, zero = _group_stats(x, 3, bits, k.dtype)
    codes = _codes(x, scale.unsqueeze(3), zero.unsqueeze(3), bits).reshape(B, H, T, D)
    return _pack(codes, 2, bits), scale, zero


def quantize_values(v: torch.Tensor, bits: int, group_size: int):
    """v [B, H, T, D] -> codes uint8 [B, H, T, D*bits/8], scale/zero [B, H, T, D/G]."""
    B, H, T, D = v.shape
    x = v.float().reshape(B, H, T, D // group_size, group_size)
    scale, zero = _group_stats(x, 4, bits, v.dtype)
    codes = _codes(x, scale.unsqueeze(4), zero.unsqueeze(4), bits).reshape(B, H, T, D)
    return _pack(codes, 3, bits), scale, zero


def dequantize_keys(codes, scale, zero, bits: int, group_size: int, dtype: torch.dtype | None = None):
    """Packed keys -> [B, H, T, D] in ``dtype`` (default: scale's dtype)."""
    c = _unpack(codes, 2, bits).float()  # [B, H, T, D]
    B, H, T, D = c.shape
    c = c.reshape(B, H, T // group_size, group_size, D)
    x = c * scale.float().unsqueeze(3) + zero.float().unsqueeze(3)
    return x.reshape(B, H, T, D).to(dtype or scale.dtype)


def dequantize_values(codes, scale, zero, bits: int, group_size: int, dtype: torch.dtype | None = None):
    """Packed values -> [B, H, T, D] in ``dtype`` (default: scale's dtype)."""
    c = _unpack(codes, 3, bits).float()  # [B, H, T, D]
    B, H, T, D = c.shape
    c = c.reshape(B, H, T, D // group_size, group_size)
    x = c * scale.float().unsqueeze(4) + zero.float().unsqueeze(4)
    return x.reshape(B, H, T, D).to(dtype or scale.dtype)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hkv * n_rep, T, D]; query head h reads KV head h // n_rep."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def qmatmul_keys(q, codes, scale, zero, bits: int, group_size: int):
    """q [B, Hq, M, D] @ dequant(K)^T -> scores [B, Hq, M, T] in q.dtype (float32 accumulation)."""
    k = dequantize_keys(codes, scale, zero, bits, group_size, torch.float32)
    k = _repeat_kv(k, q.shape[1] // k.shape[1])
    return torch.matmul(q.float(), k.transpose(-1, -2)).to(q.dtype)


def qmatmul_values(p, codes, scale, zero, bits: int, group_size: int):
    """p [B, Hq, M, T] @ dequant(V) -> [B, Hq, M, D] in p.dtype (float32 accumulation)."""
    v = dequantize_values(codes, scale, zero, bits, group_size, torch.float32)
    v = _repeat_kv(v, p.shape[1] // v.shape[1])
    return torch.matmul(p.float(), v).to(p.dtype)


def decode_attention(
    q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_residual, v_residual,
    k_bits: int, v_bits: int, group_size: int, scale: float | None = None, lengths=None,
):
    """Attention of q [B, Hq, M, D] over keys [dequant(Kq) ‖ k_residual] and values [dequant(Vq) ‖ v_residual].

    The key and value splits may differ (KIVI keeps more value tokens in full precision), but
    both concatenations hold the same T tokens. ``lengths`` (int [B]) masks positions >= lengths[b].
    Every query token sees all valid tokens (decode: the queries are the newest tokens).
    Returns [B, Hq, M, D] in q.dtype; softmax in float32.
    """
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = torch.cat([dequantize_keys(k_codes, k_scale, k_zero, k_bits, group_size, torch.float32), k_residual.float()], 2)
    v = torch.cat([dequantize_values(v_codes, v_scale, v_zero, v_bits, group_size, torch.float32), v_residual.float()], 2)
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    s = torch.matmul(q.float(), k.transpose(-1, -2)) * scale  # [B, Hq, M, T]
    if lengths is not None:
        pos = torch.arange(s.shape[-1], device=s.device)
        s = s.masked_fill(pos.view(1, 1, 1, -1) >= lengths.view(-1, 1, 1, 1).to(s.device), float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v).to(q.dtype)
