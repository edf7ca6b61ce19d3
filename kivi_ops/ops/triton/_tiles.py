"""Device helpers shared by the Q_MatMul and decode-attention kernels: load a tile of packed keys or
values, unpack the codes in registers and dequantize (nothing dequantized is written to memory), and a
``tl.dot`` wrapper whose rounding is the same on the GPU and under the interpreter (whose bfloat16
``tl.dot`` is wrong: it multiplies raw bit patterns).

Layout: ``kivi_ops.ops.layout``. ``P = 8 // bits`` codes per byte, ``G`` group size.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import f32


# tl.dot operand modes, picked by the launchers from the input dtype (``dot_mode``)
DOT_FP16 = tl.constexpr(0)  # float16 inputs: float16 operands (error 2^-12, like the inputs themselves)
DOT_TF32 = tl.constexpr(1)  # bfloat16 inputs: float32 operands on TF32 tensor cores (2^-10, 4x finer than bf16)
DOT_FP32 = tl.constexpr(2)  # float32 inputs: 3xTF32 on the GPU (about float32), IEEE under the interpreter


@triton.jit
def to_dot(x, DOT: tl.constexpr, INTERP: tl.constexpr):
    """float32 tile -> the operand ``tl.dot`` consumes in mode ``DOT``.

    Under the interpreter TF32 is emulated by truncating the low 13 mantissa bits (what the tensor
    cores read from a float32 register), so the interpreter's error is the GPU's, not smaller.
    """
    if DOT == DOT_FP16:
        return x.to(tl.float16)
    elif DOT == DOT_TF32:
        if INTERP:
            return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        else:
            return x
    else:
        return x


@triton.jit
def mma(a, b, acc, DOT: tl.constexpr, INTERP: tl.constexpr):
    """acc + a @ b (float32 accumulation) for operands produced by ``to_dot``."""
    if DOT == DOT_FP16:
        return tl.dot(a, b, acc)
    elif INTERP:
        return tl.dot(a, b, acc, input_precision="ieee")
    elif DOT == DOT_TF32:
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc, input_precision="tf32x3")


@triton.jit
def codes_f32(c):
    """int32 codes in [0, 2^23) -> float32, exactly: OR the code into the mantissa of 2^23 and
    subtract 2^23 (two full-rate ops instead of a quarter-rate int-to-float conversion)."""
    return (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def codes_f16(c):
    """uint16 codes in [0, 1024) -> float16, exactly: OR into the mantissa of 1024, subtract 1024."""
    return (c | 0x6400).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def load_keys_tile(
    codes_ptr,  # this head's codes   [Tk // P, D] uint8
    scale_ptr,  # this head's scales  [Tk // G, D]
    zero_ptr,  # this head's zeros    [Tk // G, D]
    r0,  # first byte row of the tile (tile tokens r0*P .. r0*P + BLOCK_T - 1), a multiple of BLOCK_T // P
    n_rows,  # Tk // P, rows past it are masked when MASK_ROWS
    D,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,  # <= GROUP: the tile lies inside one key group
    BLOCK_D: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    EVEN_D: tl.constexpr,
    F16: tl.constexpr = False,  # float16 scales: dequantize in float16 (one fma rounding), return float16
):
    """Dequantized keys [BLOCK_T, BLOCK_D] (float32, or float16 when F16) in natural token order,
    from one contiguous run of BLOCK_T // P code rows: byte row r holds tokens r*P + j, unpacked to
    [R, P, D] -> [R*P, D]. The tile lies inside one group: its scales and zeros are one row each."""
    tl.static_assert(BLOCK_T <= GROUP)
    P: tl.constexpr = 8 // BITS
    R: tl.constexpr = BLOCK_T // P
    CMASK: tl.constexpr = (1 << BITS) - 1
    offs_r = r0 + tl.arange(0, R)  # [R]
    offs_d = tl.arange(0, BLOCK_D)
    c_off = offs_r[:, None] * D + offs_d[None, :]  # [R, BLOCK_D]
    s_off = (r0 // (GROUP // P)) * D + offs_d  # [BLOCK_D]: the tile's group row
    if MASK_ROWS or not EVEN_D:
        m = (offs_r < n_rows)[:, None] & (offs_d < D)[None, :]
        byte = tl.load(codes_ptr + c_off, mask=m, other=0)
        s = tl.load(scale_ptr + s_off, mask=offs_d < D, other=0.0)
        z = tl.load(zero_ptr + s_off, mask=offs_d < D, other=0.0)
    else:
        byte = tl.load(codes_ptr + c_off)
        s = tl.load(scale_ptr + s_off)
        z = tl.load(zero_ptr + s_off)
    if F16:
        shifts16 = (tl.arange(0, P) * BITS).to(tl.uint16)[None, :, None]
        c = codes_f16((byte.to(tl.uint16)[:, None, :] >> shifts16) & CMASK)  # [R, P, BLOCK_D]
        k = tl.fma(c, tl.broadcast_to(s[None, None, :], c.shape), tl.broadcast_to(z[None, None, :], c.shape))
    else:
        shifts = (tl.arange(0, P) * BITS)[None, :, None]
        c = codes_f32((byte.to(tl.int32)[:, None, :] >> shifts) & CMASK)  # [R, P, BLOCK_D]
        k = c * f32(s)[None, None, :] + f32(z)[None, None, :]
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
    F16: tl.constexpr = False,  # float16 scales: dequantize in float16, return float16
):
    """Dequantized values [BLOCK_T, BLOCK_D] (float32, or float16 when F16): BLOCK_T contiguous code
    rows of D // P bytes,
    byte c holding channels c*P + j, unpacked to [T, C, P] = [T, NG, G] (group-major) -> [T, D].
    Scales and zeros are loaded once per (token, group), not per element."""
    P: tl.constexpr = 8 // BITS
    C: tl.constexpr = BLOCK_D // P
    NGB: tl.constexpr = BLOCK_D // GROUP
    CMASK: tl.constexpr = (1 << BITS) - 1
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, C)
    offs_g = tl.arange(0, NGB)
    n_cols = D // P
    n_groups = D // GROUP
    c_off = offs_t[:, None] * n_cols + offs_c[None, :]  # [BLOCK_T, C]
    s_off = offs_t[:, None] * n_groups + offs_g[None, :]  # [BLOCK_T, NGB]
    if MASK_ROWS or not EVEN_D:
        tmask = (offs_t < n_tok)[:, None]
        byte = tl.load(codes_ptr + c_off, mask=tmask & (offs_c < n_cols)[None, :], other=0)
        sm = tmask & (offs_g < n_groups)[None, :]
        s = tl.load(scale_ptr + s_off, mask=sm, other=0.0)
        z = tl.load(zero_ptr + s_off, mask=sm, other=0.0)
    else:
        byte = tl.load(codes_ptr + c_off)
        s = tl.load(scale_ptr + s_off)
        z = tl.load(zero_ptr + s_off)
    if F16:
        shifts16 = (tl.arange(0, P) * BITS).to(tl.uint16)[None, None, :]
        c = (byte.to(tl.uint16)[:, :, None] >> shifts16) & CMASK  # [BLOCK_T, C, P]
        c = codes_f16(tl.reshape(c, [BLOCK_T, NGB, GROUP]))  # channel order c*P + j = g*G + i
        v = tl.fma(c, tl.broadcast_to(s[:, :, None], c.shape), tl.broadcast_to(z[:, :, None], c.shape))
    else:
        shifts = (tl.arange(0, P) * BITS)[None, None, :]
        c = (byte.to(tl.int32)[:, :, None] >> shifts) & CMASK  # [BLOCK_T, C, P]
        c = codes_f32(tl.reshape(c, [BLOCK_T, NGB, GROUP]))  # channel order c*P + j = g*G + i
        v = c * f32(s)[:, :, None] + f32(z)[:, :, None]
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
    c = codes_f32((byte.to(tl.int32) >> ((offs_t % P) * BITS)[:, None]) & CMASK)
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
    c = codes_f32((byte.to(tl.int32) >> ((offs_d % P) * BITS)[None, :]) & CMASK)
    vq = c * s + z
    vr = f32(tl.load(res_ptr + (offs_t - Tv)[:, None] * D + offs_d[None, :], mask=in_r[:, None] & dmask, other=0.0))
    return tl.where(in_q[:, None], vq, vr)
