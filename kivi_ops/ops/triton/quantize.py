"""Triton quantize / dequantize kernels for KIVI keys (per-channel groups) and values (per-token groups).

Layout and numerics: ``kivi_ops.ops.layout`` (followed exactly; codes, scale and zero match the
reference bit for bit). Shapes: ``B`` batch, ``H`` heads, ``T`` tokens, ``D`` head_dim,
``G`` group_size, ``P = 8 // bits`` codes per byte.

Every launcher runs under ``torch.library.wrap_triton`` so Inductor / AOTInductor can trace into it;
on CPU tensors the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import cast, cast_round_up, f32, interpreting, next_pow2, pow2_group, shapes_only

# ----------------------------------------------------------------------------------------------
# shared device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _group_quant(x, mask, AXIS: tl.constexpr, QMAX: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """Min-max quantize float32 ``x`` along ``AXIS`` (one group per slice).

    Returns (scale, zero, code): scale/zero float32 holding the STORED values (scale rounded up to
    ``OUT_DTYPE`` as ``reference.round_up_cast`` does, zero = min rounded, exact), reduced along ``AXIS``; code int32 of ``x``'s shape. Masked-off elements take no part
    in the statistics. A group with any non-finite element (or whose stored range is not finite)
    gets scale = zero = NaN and codes 0.
    """
    inf = float("inf")
    # NaN-aware: tl.min/tl.max may drop NaN on GPU, so non-finite elements are counted explicitly.
    finite = tl.abs(x) < inf  # False for NaN and +-Inf
    n_bad = tl.sum(tl.where(mask & (finite == 0), 1, 0), axis=AXIS)
    use = mask & finite  # NaN never reaches min/max; a group with one is overwritten below
    lo = tl.min(tl.where(use, x, inf), axis=AXIS)
    hi = tl.max(tl.where(use, x, -inf), axis=AXIS)
    rng = hi - lo
    s = f32(cast_round_up(tl.math.div_rn(rng, tl.zeros_like(rng) + QMAX), OUT_DTYPE))
    z = f32(cast(lo, OUT_DTYPE))
    bad = (n_bad > 0) | ((tl.abs(s) < inf) == 0) | ((tl.abs(z) < inf) == 0)
    s = tl.where(bad, float("nan"), s)
    z = tl.where(bad, float("nan"), z)
    # codes from the stored scale/zero, IEEE-rounded division
    ok = tl.broadcast_to(tl.expand_dims(s > 0, AXIS), x.shape)  # False for s == 0 and NaN
    se = tl.broadcast_to(tl.expand_dims(s, AXIS), x.shape)
    ze = tl.broadcast_to(tl.expand_dims(z, AXIS), x.shape)
    t = tl.math.div_rn(x - ze, tl.where(ok, se, 1.0))
    t = tl.where(ok, t, 0.0)
    code = tl.minimum(tl.maximum(tl.floor(t + 0.5), 0.0), QMAX).to(tl.int32)
    return s, z, code


@triton.jit
def _dequant_exact(c, s, z, PTX_MUL: tl.constexpr):
    """``c * s + z`` in float32 with the product rounded on its own (no FMA contraction).

    For fp16/bf16 scales the product of a <=8-bit code and the scale is exact in float32, so an FMA
    gives the same bits; for float32 scales the launcher sets ``PTX_MUL`` on CUDA so the product is
    an explicitly rounded ``mul.rn.f32`` that the compiler cannot fuse with the add.
    """
    if PTX_MUL:
        p = tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=f,f,f", [c, s], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        p = c * s
    return p + z


# ----------------------------------------------------------------------------------------------
# quantize keys: per-channel groups of G tokens
# ----------------------------------------------------------------------------------------------


@triton.jit
def _quantize_keys_kernel(
    k_ptr,  # [B*H, T, D]            float
    codes_ptr,  # [B*H, T // P, D]   uint8
    scale_ptr,  # [B*H, T // G, D]   k.dtype
    zero_ptr,  # [B*H, T // G, D]    k.dtype
    T,
    D,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid: (B*H*(T//G), cdiv(D, BLOCK_D)); one program = one token group x BLOCK_D channels
    P: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    n_groups = T // GROUP
    bh = (pid // n_groups).to(tl.int64)
    g = pid % n_groups

    offs_t = tl.arange(0, GROUP)  # [G]
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    dmask = offs_d < D
    mask = (offs_t[:, None] >= 0) & dmask[None, :]  # [G, BLOCK_D]
    rows = bh * T + g * GROUP + offs_t  # [G]
    x = f32(tl.load(k_ptr + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0))

    s, z, code = _group_quant(x, mask, 0, QMAX, scale_ptr.dtype.element_ty)  # [BLOCK_D], [G, BLOCK_D]
    sz_off = (bh * n_groups + g) * D + offs_d
    tl.store(scale_ptr + sz_off, cast(s, scale_ptr.dtype.element_ty), mask=dmask)
    tl.store(zero_ptr + sz_off, cast(z, zero_ptr.dtype.element_ty), mask=dmask)

    # pack: token r*P + j -> byte row r, bits [j*BITS, (j+1)*BITS)
    code3 = tl.reshape(code, [GROUP // P, P, BLOCK_D])
    shifts = (tl.arange(0, P) * BITS)[None, :, None]
    packed = tl.sum(code3 << shifts, axis=1).to(tl.uint8)  # [G//P, BLOCK_D]
    offs_r = tl.arange(0, GROUP // P)
    crow = bh * (T // P) + g * (GROUP // P) + offs_r
    tl.store(codes_ptr + crow[:, None] * D + offs_d[None, :], packed, mask=dmask[None, :])


def _quantize_keys(k: torch.Tensor, bits: int, group_size: int):
    B, H, T, D = k.shape
    G = pow2_group(group_size)
    P = 8 // bits
    k = k.contiguous()
    codes = torch.empty((B, H, T // P, D), dtype=torch.uint8, device=k.device)
    scale = torch.empty((B, H, T // G, D), dtype=k.dtype, device=k.device)
    zero = torch.empty_like(scale)
    if k.numel() == 0:
        return codes, scale, zero
    if shapes_only(k, _quantize_keys_kernel):
        return codes, scale, zero
    BLOCK_D = min(next_pow2(D), max(16, 4096 // G))
    grid = (B * H * (T // G), triton.cdiv(D, BLOCK_D))
    wrap_triton(_quantize_keys_kernel)[grid](
        k, codes, scale, zero, T, D, BITS=bits, GROUP=G, BLOCK_D=BLOCK_D, num_warps=4
    )
    return codes, scale, zero


@triton_op("kivi::triton_quantize_keys", mutates_args=())
def triton_quantize_keys(k: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _quantize_keys(k, bits, group_size)


# ----------------------------------------------------------------------------------------------
# quantize values: per-token groups of G channels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _quantize_values_kernel(
    v_ptr,  # [N = B*H*T, D]            float
    codes_ptr,  # [N, D // P]           uint8
    scale_ptr,  # [N, D // G]           v.dtype
    zero_ptr,  # [N, D // G]            v.dtype
    N,
    D,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next_pow2(D) >= G
):
    # grid: (cdiv(N, BLOCK_N),); one program = BLOCK_N tokens x all channels
    P: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    NGB: tl.constexpr = BLOCK_D // GROUP
    pid = tl.program_id(0)
    offs_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BLOCK_N]
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < N
    mask = nmask[:, None] & (offs_d < D)[None, :]  # [BLOCK_N, BLOCK_D]
    x = f32(tl.load(v_ptr + offs_n[:, None] * D + offs_d[None, :], mask=mask, other=0.0))

    x3 = tl.reshape(x, [BLOCK_N, NGB, GROUP])
    m3 = tl.reshape(mask, [BLOCK_N, NGB, GROUP])
    s, z, code = _group_quant(x3, m3, 2, QMAX, scale_ptr.dtype.element_ty)  # [BLOCK_N, NGB], [.., G]
    n_groups = D // GROUP
    offs_g = tl.arange(0, NGB)
    gmask = nmask[:, None] & (offs_g < n_groups)[None, :]
    sz_off = offs_n[:, None] * n_groups + offs_g[None, :]
    tl.store(scale_ptr + sz_off, cast(s, scale_ptr.dtype.element_ty), mask=gmask)
    tl.store(zero_ptr + sz_off, cast(z, zero_ptr.dtype.element_ty), mask=gmask)

    # pack: channel c*P + j -> byte c, bits [j*BITS, (j+1)*BITS)
    code3 = tl.reshape(code, [BLOCK_N, BLOCK_D // P, P])
    shifts = (tl.arange(0, P) * BITS)[None, None, :]
    packed = tl.sum(code3 << shifts, axis=2).to(tl.uint8)  # [BLOCK_N, BLOCK_D // P]
    offs_c = tl.arange(0, BLOCK_D // P)
    n_cols = D // P
    cmask = nmask[:, None] & (offs_c < n_cols)[None, :]
    tl.store(codes_ptr + offs_n[:, None] * n_cols + offs_c[None, :], packed, mask=cmask)


def _quantize_values(v: torch.Tensor, bits: int, group_size: int):
    B, H, T, D = v.shape
    G = pow2_group(group_size)
    P = 8 // bits
    v = v.contiguous()
    codes = torch.empty((B, H, T, D // P), dtype=torch.uint8, device=v.device)
    scale = torch.empty((B, H, T, D // G), dtype=v.dtype, device=v.device)
    zero = torch.empty_like(scale)
    N = B * H * T
    if N == 0:
        return codes, scale, zero
    if shapes_only(v, _quantize_values_kernel):
        return codes, scale, zero
    BLOCK_D = max(next_pow2(D), G)
    BLOCK_N = max(1, min(64, 4096 // BLOCK_D, next_pow2(N)))
    grid = (triton.cdiv(N, BLOCK_N),)
    wrap_triton(_quantize_values_kernel)[grid](
        v, codes, scale, zero, N, D, BITS=bits, GROUP=G, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=4
    )
    return codes, scale, zero


@triton_op("kivi::triton_quantize_values", mutates_args=())
def triton_quantize_values(v: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _quantize_values(v, bits, group_size)


# ----------------------------------------------------------------------------------------------
# dequantize keys
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dequantize_keys_kernel(
    codes_ptr,  # [B*H, T // P, D]   uint8
    scale_ptr,  # [B*H, T // G, D]
    zero_ptr,  # [B*H, T // G, D]
    out_ptr,  # [B*H, T, D]          scale.dtype
    T,
    D,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr,  # byte rows per program (BLOCK_R * P tokens)
    BLOCK_D: tl.constexpr,
    PTX_MUL: tl.constexpr,
):
    # grid: (B*H, cdiv(T // P, BLOCK_R), cdiv(D, BLOCK_D))
    P: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    bh = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # byte rows [BLOCK_R]
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_rows = T // P
    mask = (offs_r < n_rows)[:, None] & (offs_d < D)[None, :]  # [BLOCK_R, BLOCK_D]
    byte = tl.load(codes_ptr + (bh * n_rows + offs_r)[:, None] * D + offs_d[None, :], mask=mask, other=0)
    # group of token r*P + j is r // (G // P): one scale row per byte row
    grp = offs_r // (GROUP // P)
    sz_off = (bh * (T // GROUP) + grp)[:, None] * D + offs_d[None, :]
    s = f32(tl.load(scale_ptr + sz_off, mask=mask, other=0.0))
    z = f32(tl.load(zero_ptr + sz_off, mask=mask, other=0.0))
    shifts = (tl.arange(0, P) * BITS)[None, :, None]
    c = ((byte.to(tl.int32)[:, None, :] >> shifts) & MASK).to(tl.float32)  # [BLOCK_R, P, BLOCK_D]
    x = _dequant_exact(c, tl.broadcast_to(s[:, None, :], c.shape), tl.broadcast_to(z[:, None, :], c.shape), PTX_MUL)
    x = tl.reshape(x, [BLOCK_R * P, BLOCK_D])  # token order r*P + j
    offs_t = tl.program_id(1) * (BLOCK_R * P) + tl.arange(0, BLOCK_R * P)
    omask = (offs_t < T)[:, None] & (offs_d < D)[None, :]
    tl.store(out_ptr + (bh * T + offs_t)[:, None] * D + offs_d[None, :], cast(x, out_ptr.dtype.element_ty), mask=omask)


def _ptx_mul(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cuda" and torch.version.hip is None and not interpreting(t)


def _dequantize_keys(codes, scale, zero, bits: int, group_size: int):
    B, H, R, D = codes.shape
    G = pow2_group(group_size)
    P = 8 // bits
    T = R * P
    codes, scale, zero = codes.contiguous(), scale.contiguous(), zero.contiguous()
    out = torch.empty((B, H, T, D), dtype=scale.dtype, device=codes.device)
    if out.numel() == 0:
        return out
    if shapes_only(codes, _dequantize_keys_kernel):
        return out
    BLOCK_D = min(next_pow2(D), 128)
    BLOCK_R = max(1, min(next_pow2(R), 4096 // (BLOCK_D * P)))
    grid = (B * H, triton.cdiv(R, BLOCK_R), triton.cdiv(D, BLOCK_D))
    wrap_triton(_dequantize_keys_kernel)[grid](
        codes, scale, zero, out, T, D,
        BITS=bits, GROUP=G, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, PTX_MUL=_ptx_mul(scale), num_warps=4,
    )
    return out


@triton_op("kivi::triton_dequantize_keys", mutates_args=())
def triton_dequantize_keys(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    return _dequantize_keys(codes, scale, zero, bits, group_size)


# ----------------------------------------------------------------------------------------------
# dequantize values
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dequantize_values_kernel(
    codes_ptr,  # [N = B*H*T, D // P]   uint8
    scale_ptr,  # [N, D // G]
    zero_ptr,  # [N, D // G]
    out_ptr,  # [N, D]                  scale.dtype
    N,
    D,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,  # next_pow2(D // P)
    PTX_MUL: tl.constexpr,
):
    # grid: (cdiv(N, BLOCK_N),)
    P: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)  # byte columns
    n_cols = D // P
    mask = (offs_n < N)[:, None] & (offs_c < n_cols)[None, :]  # [BLOCK_N, BLOCK_C]
    byte = tl.load(codes_ptr + offs_n[:, None] * n_cols + offs_c[None, :], mask=mask, other=0)
    # channel c*P + j is in group c // (G // P): one scale per byte column
    n_groups = D // GROUP
    sz_off = offs_n[:, None] * n_groups + (offs_c // (GROUP // P))[None, :]
    s = f32(tl.load(scale_ptr + sz_off, mask=mask, other=0.0))
    z = f32(tl.load(zero_ptr + sz_off, mask=mask, other=0.0))
    shifts = (tl.arange(0, P) * BITS)[None, None, :]
    c = ((byte.to(tl.int32)[:, :, None] >> shifts) & MASK).to(tl.float32)  # [BLOCK_N, BLOCK_C, P]
    x = _dequant_exact(c, tl.broadcast_to(s[:, :, None], c.shape), tl.broadcast_to(z[:, :, None], c.shape), PTX_MUL)
    x = tl.reshape(x, [BLOCK_N, BLOCK_C * P])  # channel order c*P + j
    offs_d = tl.arange(0, BLOCK_C * P)
    omask = (offs_n < N)[:, None] & (offs_d < D)[None, :]
    tl.store(out_ptr + offs_n[:, None] * D + offs_d[None, :], cast(x, out_ptr.dtype.element_ty), mask=omask)


def _dequantize_values(codes, scale, zero, bits: int, group_size: int):
    B, H, T, C = codes.shape
    G = pow2_group(group_size)
    P = 8 // bits
    D = C * P
    codes, scale, zero = codes.contiguous(), scale.contiguous(), zero.contiguous()
    out = torch.empty((B, H, T, D), dtype=scale.dtype, device=codes.device)
    N = B * H * T
    if out.numel() == 0:
        return out
    if shapes_only(codes, _dequantize_values_kernel):
        return out
    BLOCK_C = next_pow2(C)
    BLOCK_N = max(1, min(64, 4096 // (BLOCK_C * P), next_pow2(N)))
    grid = (triton.cdiv(N, BLOCK_N),)
    wrap_triton(_dequantize_values_kernel)[grid](
        codes, scale, zero, out, N, D,
        BITS=bits, GROUP=G, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, PTX_MUL=_ptx_mul(scale), num_warps=4,
    )
    return out


@triton_op("kivi::triton_dequantize_values", mutates_args=())
def triton_dequantize_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    return _dequantize_values(codes, scale, zero, bits, group_size)
