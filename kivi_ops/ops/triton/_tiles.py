"""Device helpers shared by the Q_MatMul and decode-attention kernels: load a tile of packed keys or
values, unpack the codes in registers and dequantize (nothing dequantized is written to memory), and a
``tl.dot`` wrapper that behaves the same on the GPU and under the interpreter.

Layout: ``kivi_ops.ops.layout``. ``P = 8 // bits`` codes per byte, ``G`` group size.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import cast, f32


@triton.jit
def to_dot(x, DOT_DTYPE: tl.constexpr, INTERP: tl.constexpr):
    """float32 tile -> the operand ``tl.dot`` consumes: rounded to ``DOT_DTYPE``.

    The interpreter's bfloat16 ``tl.dot`` is wrong (it multiplies raw bit patterns), so there the
    rounded values are handed over as float32: the same products, float32 accumulation.
    """
    if DOT_DTYPE == tl.float32:
        return x
    elif INTERP:
        return f32(cast(x, DOT_DTYPE))
    else:
        return x.to(DOT_DTYPE)


@triton.jit
def mma(a, b, acc, DOT_DTYPE: tl.constexpr, INTERP: tl.constexpr):
    """acc + a @ b for operands produced by ``to_dot`` (float32 accumulation; IEEE for float32)."""
    if DOT_DTYPE == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    elif INTERP:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def load_keys_tile(
    codes_ptr,  # this head's codes   [Tk // P, D] uint8
    scale_ptr,  # this head's scales  [Tk // G, D]
    zero_ptr,  # this head's zeros    [Tk // G, D]
    r0,  # first byte row of the tile (tile tokens r0*P .. r0*P + BLOCK_T - 1)
    n_rows,  # Tk // P, rows past it are masked when MASK_ROWS
    D,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """Dequantized keys [BLOCK_T, BLOCK_D] float32 in natural token order, from one contiguous run
    of BLOCK_T // P code rows: byte row r holds tokens r*P + j, unpacked to [R, P, D] -> [R*P, D]."""
    P: tl.constexpr = 8 // BITS
    R: tl.constexpr = BLOCK_T // P
    CMASK: tl.constexpr = (1 << BITS) - 1
    offs_r = r0 + tl.arange(0, R)  # [R]
    offs_d = tl.arange(0, BLOCK_D)
    grp = offs_r // (GROUP // P)  # group of every token in byte row r
    c_off = offs_r[:, None] * D + offs_d[None, :]  # [R, BLOCK_D]
    s_off = grp[:, None] * D + offs_d[None, :]
    if MASK_ROWS or not EVEN_D:
        m = (offs_r < n_rows)[:, None] & (offs_d < D)[None, :]
        byte = tl.load(codes_ptr + c_off, mask=m, other=0)
        s = f32(tl.load(scale_ptr + s_off, mask=m, other=0.0))
        z = f32(tl.load(zero_ptr + s_off, mask=m, other=0.0))
    else:
        byte = tl.load(codes_ptr + c_off)
        s = f32(tl.load(scale_ptr + s_off))
        z = f32(tl.load(zero_ptr + s_off))
    shifts = (tl.arange(0, P) * BITS)[None, :, None]
    c = ((byte.to(tl.int32)[:, None, :] >> shifts) & CMASK).to(tl.float32)  # [R, P, BLOCK_D]
    k = c * s[:, None, :] + z[:, None, :]
    return tl.reshape(k, [BLOCK_T, BLOCK_D])


@triton.jit
def load_values_tile(
    codes_ptr,  # this head's codes   [Tv, D // P] uint8
    scale_ptr,  # this head's scales  [Tv, D // G]
    zero_ptr,  # this head's zeros    [Tv, D // G]
    t0,  # first token of the tile
    n_tok,  # Tv, tokens past it are masked when MASK_ROWS
    D,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """Dequantized values [BLOCK_T, BLOCK_D] float32: BLOCK_T contiguous code rows of D // P bytes,
    byte c holding channels c*P + j, unpacked to [T, C, P] -> [T, C*P]."""
    P: tl.constexpr = 8 // BITS
    C: tl.constexpr = BLOCK_D // P
    CMASK: tl.constexpr = (1 << BITS) - 1
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, C)
    n_cols = D // P
    n_groups = D // GROUP
    c_off = offs_t[:, None] * n_cols + offs_c[None, :]  # [BLOCK_T, C]
    s_off = offs_t[:, None] * n_groups + (offs_c // (GROUP // P))[None, :]
    if MASK_ROWS or not EVEN_D:
        m = (offs_t < n_tok)[:, None] & (offs_c < n_cols)[None, :]
        byte = tl.load(codes_ptr + c_off, mask=m, other=0)
        s = f32(tl.load(scale_ptr + s_off, mask=m, other=0.0))
        z = f32(tl.load(zero_ptr + s_off, mask=m, other=0.0))
    else:
        byte = tl.load(codes_ptr + c_off)
        s = f32(tl.load(scale_ptr + s_off))
        z = f32(tl.load(zero_ptr + s_off))
    shifts = (tl.arange(0, P) * BITS)[None, None, :]
    c = ((byte.to(tl.int32)[:, :, None] >> shifts) & CMASK).to(tl.float32)  # [BLOCK_T, C, P]
    v = c * s[:, :, None] + z[:, :, None]
    return tl.reshape(v, [BLOCK_T, BLOCK_D])


@triton.jit
def load_keys_mixed(
    codes_ptr, scale_ptr, zero_ptr,  # this head's packed keys (see load_keys_tile), Tk tokens
    res_ptr,  # this head's residual keys [T - Tk, D]
    offs_t,  # [BLOCK_T] token positions
    valid,  # [BLOCK_T] which positions to load at all
    Tk,
    D,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Keys [BLOCK_T, BLOCK_D] float32 for arbitrary positions: token t from the packed part when
    t < Tk, else residual row t - Tk; 0 where not valid. Gathers byte t // P per token (tail path)."""
    P: tl.constexpr = 8 // BITS
    CMASK: tl.constexpr = (1 << BITS) - 1
    offs_d = tl.arange(0, BLOCK_D)
    dmask = (offs_d < D)[None, :]
    in_q = valid & (offs_t < Tk)
    in_r = valid & (offs_t >= Tk)
    mq = in_q[:, None] & dmask
    byte = tl.load(codes_ptr + (offs_t // P)[:, None] * D + offs_d[None, :], mask=mq, other=0)
    s_off = (offs_t // GROUP)[:, None] * D + offs_d[None, :]
    s = f32(tl.load(scale_ptr + s_off, mask=mq, other=0.0))
    z = f32(tl.load(zero_ptr + s_off, mask=mq, other=0.0))
    c = ((byte.to(tl.int32) >> ((offs_t % P) * BITS)[:, None]) & CMASK).to(tl.float32)
    kq = c * s + z
    kr = f32(tl.load(res_ptr + (offs_t - Tk)[:, None] * D + offs_d[None, :], mask=in_r[:, None] & dmask, other=0.0))
    return tl.where(in_q[:, None], kq, kr)


@triton.jit
def load_values_mixed(
    codes_ptr, scale_ptr, zero_ptr,  # this head's packed values (see load_values_tile), Tv tokens
    res_ptr,  # this head's residual values [T - Tv, D]
    offs_t,  # [BLOCK_T] token positions
    valid,  # [BLOCK_T]
    Tv,
    D,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Values [BLOCK_T, BLOCK_D] float32 for arbitrary positions: packed when t < Tv, else residual
    row t - Tv; 0 where not valid (so a masked token never turns p = 0 into NaN)."""
    P: tl.constexpr = 8 // BITS
    CMASK: tl.constexpr = (1 << BITS) - 1
    offs_d = tl.arange(0, BLOCK_D)
    dmask = (offs_d < D)[None, :]
    in_q = valid & (offs_t < Tv)
    in_r = valid & (offs_t >= Tv)
    mq = in_q[:, None] & dmask
    byte = tl.load(codes_ptr + offs_t[:, None] * (D // P) + (offs_d // P)[None, :], mask=mq, other=0)
    s_off = offs_t[:, None] * (D // GROUP) + (offs_d // GROUP)[None, :]
    s = f32(tl.load(scale_ptr + s_off, mask=mq, other=0.0))
    z = f32(tl.load(zero_ptr + s_off, mask=mq, other=0.0))
    c = ((byte.to(tl.int32) >> ((offs_d % P) * BITS)[None, :]) & CMASK).to(tl.float32)
    vq = c * s + z
    vr = f32(tl.load(res_ptr + (offs_t - Tv)[:, None] * D + offs_d[None, :], mask=in_r[:, None] & dmask, other=0.0))
    return tl.where(in_q[:, None], vq, vr)
