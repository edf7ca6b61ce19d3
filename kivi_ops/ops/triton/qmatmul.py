"""Triton Q_MatMul: ``q @ dequant(K)^T`` and ``p @ dequant(V)`` straight from the packed KIVI layout.

Codes are loaded as whole contiguous tiles, unpacked and dequantized in registers; no dequantized K/V
is written to memory. The packed tensors need contiguous rows only: each program steps to its
(batch, head) through the tensor's own strides, so a cache's views (the used rows of a buffer with
spare rows) are read in place, not copied. One program serves all ``n_rep * M`` query rows of one
KV head (grouped-query attention reads each KV head once): query head h reads KV head h // n_rep,
and the rows of KV head ``hkv`` are the contiguous block ``[hkv*n_rep*M, (hkv+1)*n_rep*M)`` of
``q.view(B, Hq*M, D)``.

Layout: ``kivi_ops.ops.layout``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._common import (batch_head_strides, cast, dot_mode, f32, interpreting, launcher, next_pow2, num_sms, pow2_group,
                      rows_contiguous, shapes_only)
from ._tiles import DOT_FP16, load_keys_tile, load_values_tile, mma, to_dot

# ----------------------------------------------------------------------------------------------
# scores = q @ dequant(K)^T
# ----------------------------------------------------------------------------------------------


@triton.jit
def _qmatmul_keys_kernel(
    q_ptr,  # [B, Hq, M, D] = [B*Hkv, ROWS, D]          ROWS = n_rep * M
    codes_ptr,  # [B, Hkv, T // P, D] uint8      rows contiguous, batch/head strides below
    scale_ptr,  # [B, Hkv, T // G, D]
    zero_ptr,  # [B, Hkv, T // G, D]
    out_ptr,  # [B, Hq, M, T] = [B*Hkv, ROWS, T]       q.dtype
    c_sb, c_sh, s_sb, s_sh, z_sb, z_sh,  # (batch, head) strides of codes, scale, zero
    HKV,
    T,
    ROWS: tl.constexpr,
    ROWS_PAD: tl.constexpr,  # >= 16 (tl.dot)
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT: tl.constexpr,
    INTERP: tl.constexpr,
):
    # grid: (B*Hkv, cdiv(T, BLOCK_T))
    P: tl.constexpr = 8 // BITS
    EVEN_D: tl.constexpr = BLOCK_D == D
    bh = tl.program_id(0).to(tl.int64)
    b = bh // HKV
    h = bh % HKV
    tb = tl.program_id(1)
    offs_i = tl.arange(0, ROWS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    q = f32(tl.load(q_ptr + (bh * ROWS + offs_i)[:, None] * D + offs_d[None, :],
                    mask=(offs_i < ROWS)[:, None] & (offs_d < D)[None, :], other=0.0))  # [ROWS_PAD, BLOCK_D]
    k = load_keys_tile(codes_ptr + b * c_sb + h * c_sh, scale_ptr + b * s_sb + h * s_sh,
                       zero_ptr + b * z_sb + h * z_sh, tb * (BLOCK_T // P), T // P, D, BITS, GROUP, BLOCK_T,
                       BLOCK_D, True, EVEN_D, DOT == DOT_FP16)  # [BLOCK_T, BLOCK_D]
    acc = tl.zeros([ROWS_PAD, BLOCK_T], dtype=tl.float32)
    acc = mma(to_dot(q, DOT, INTERP), tl.trans(to_dot(k, DOT, INTERP)), acc, DOT, INTERP)
    offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    omask = (offs_i < ROWS)[:, None] & (offs_t < T)[None, :]
    tl.store(out_ptr + (bh * ROWS + offs_i)[:, None] * T + offs_t[None, :], cast(acc, out_ptr.dtype.element_ty), mask=omask)


def _rows_pad(rows: int) -> int:
    return max(16, next_pow2(rows))


def _qmatmul_keys(q, codes, scale, zero, bits: int, group_size: int):
    B, Hq, M, D = q.shape
    Hkv = codes.shape[1]
    P = 8 // bits
    T = codes.shape[2] * P
    G = pow2_group(group_size)
    rows = (Hq // Hkv) * M
    q, codes, scale, zero = q.contiguous(), rows_contiguous(codes), rows_contiguous(scale), rows_contiguous(zero)
    out = torch.empty((B, Hq, M, T), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if shapes_only(q, _qmatmul_keys_kernel):
        return out
    BLOCK_D = next_pow2(D)
    BLOCK_T = min(G, 64)  # a key tile lies inside one group (G >= 32)
    grid = (B * Hkv, triton.cdiv(T, BLOCK_T))
    launcher(_qmatmul_keys_kernel, grid, q, codes, scale, zero)(
        q, codes, scale, zero, out, *batch_head_strides(codes, scale, zero), Hkv, T,
        ROWS=rows, ROWS_PAD=_rows_pad(rows), D=D, BLOCK_D=BLOCK_D, BITS=bits, GROUP=G, BLOCK_T=BLOCK_T,
        DOT=dot_mode(q.dtype), INTERP=interpreting(q), num_warps=4,
    )
    return out


@triton_op("kivi::triton_qmatmul_keys", mutates_args=())
def triton_qmatmul_keys(q: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                        group_size: int) -> torch.Tensor:
    return _qmatmul_keys(q, codes, scale, zero, bits, group_size)


# ----------------------------------------------------------------------------------------------
# out = p @ dequant(V): token range split across programs, partial sums reduced by a second kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _qmatmul_values_kernel(
    p_ptr,  # [B, Hq, M, T] = [B*Hkv, ROWS, T]
    codes_ptr,  # [B, Hkv, T, D // P] uint8      rows contiguous, batch/head strides below
    scale_ptr,  # [B, Hkv, T, D // G]
    zero_ptr,  # [B, Hkv, T, D // G]
    out_ptr,  # DIRECT: [B*Hkv, ROWS, D] p.dtype; else workspace [B*Hkv, S, ROWS, D] float32
    c_sb, c_sh, s_sb, s_sh, z_sb, z_sh,  # (batch, head) strides of codes, scale, zero
    HKV,
    T,
    tokens_per_split,  # a multiple of BLOCK_T
    ROWS: tl.constexpr,
    ROWS_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT: tl.constexpr,
    INTERP: tl.constexpr,
    DIRECT: tl.constexpr,  # one split: write the result, no workspace
):
    # grid: (B*Hkv, S)
    P: tl.constexpr = 8 // BITS
    EVEN_D: tl.constexpr = BLOCK_D == D
    bh = tl.program_id(0).to(tl.int64)
    b = bh // HKV
    h = bh % HKV
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, T)
    offs_i = tl.arange(0, ROWS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    imask = offs_i < ROWS
    p_rows = p_ptr + (bh * ROWS + offs_i)[:, None] * T
    c_base = codes_ptr + b * c_sb + h * c_sh
    s_base = scale_ptr + b * s_sb + h * s_sh
    z_base = zero_ptr + b * z_sb + h * z_sh
    acc = tl.zeros([ROWS_PAD, BLOCK_D], dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        pt = f32(tl.load(p_rows + offs_t[None, :], mask=imask[:, None] & (offs_t < end)[None, :], other=0.0))
        v = load_values_tile(c_base, s_base, z_base, t0, end, D, BITS, GROUP, BLOCK_T, BLOCK_D, True, EVEN_D,
                             DOT == DOT_FP16)
        acc = mma(to_dot(pt, DOT, INTERP), to_dot(v, DOT, INTERP), acc, DOT, INTERP)
    omask = imask[:, None] & (offs_d < D)[None, :]
    if DIRECT:
        tl.store(out_ptr + (bh * ROWS + offs_i)[:, None] * D + offs_d[None, :], cast(acc, out_ptr.dtype.element_ty),
                 mask=omask)
    else:
        row = (bh * n_splits + split) * ROWS + offs_i
        tl.store(out_ptr + row[:, None] * D + offs_d[None, :], acc, mask=omask)


@triton.jit
def _split_sum_kernel(
    ws_ptr,  # [B*Hkv, S, ROWS, D] float32
    out_ptr,  # [B*Hkv, ROWS, D]
    S,
    ROWS: tl.constexpr,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid: (B*Hkv*ROWS,): one output row, summed over the S splits in a fixed order
    row = tl.program_id(0).to(tl.int64)
    bh = row // ROWS
    i = row % ROWS
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        m = (offs_s < S)[:, None] & (offs_d < D)[None, :]
        x = tl.load(ws_ptr + ((bh * S + offs_s) * ROWS + i)[:, None] * D + offs_d[None, :], mask=m, other=0.0)
        acc += tl.sum(x, axis=0)
    tl.store(out_ptr + row * D + offs_d, cast(acc, out_ptr.dtype.element_ty), mask=offs_d < D)


def _num_splits(n_blocks: int, programs: int, device: torch.device, waves: int = 4) -> int:
    """Splits of the token range so that ``programs * splits`` fills the GPU ``waves`` times over."""
    want = triton.cdiv(num_sms(device) * waves, max(programs, 1))
    return max(1, min(n_blocks, want))


def _qmatmul_values(p, codes, scale, zero, bits: int, group_size: int):
    B, Hq, M, T = p.shape
    Hkv = codes.shape[1]
    P = 8 // bits
    D = codes.shape[3] * P
    G = pow2_group(group_size)
    rows = (Hq // Hkv) * M
    p, codes, scale, zero = p.contiguous(), rows_contiguous(codes), rows_contiguous(scale), rows_contiguous(zero)
    out = torch.empty((B, Hq, M, D), dtype=p.dtype, device=p.device)
    if out.numel() == 0:
        return out
    if T == 0:
        return out.zero_()
    if shapes_only(p, _qmatmul_values_kernel):
        return out
    BLOCK_D = next_pow2(D)
    BLOCK_T = 64 if BLOCK_D <= 64 else 32
    n_blocks = triton.cdiv(T, BLOCK_T)
    splits = _num_splits(n_blocks, B * Hkv, p.device)
    tokens_per_split = triton.cdiv(n_blocks, splits) * BLOCK_T
    splits = triton.cdiv(T, tokens_per_split)
    meta = dict(ROWS=rows, ROWS_PAD=_rows_pad(rows), D=D, BLOCK_D=BLOCK_D, BITS=bits, GROUP=G, BLOCK_T=BLOCK_T,
                DOT=dot_mode(p.dtype), INTERP=interpreting(p), num_warps=4,
                num_stages=1 if p.dtype == torch.float32 else 2)
    strides = (*batch_head_strides(codes, scale, zero), Hkv)
    if splits == 1:
        launcher(_qmatmul_values_kernel, (B * Hkv, 1), p, codes, scale, zero)(
            p, codes, scale, zero, out, *strides, T, tokens_per_split, DIRECT=True, **meta)
        return out
    ws = torch.empty((B * Hkv, splits, rows, D), dtype=torch.float32, device=p.device)
    launcher(_qmatmul_values_kernel, (B * Hkv, splits), p, codes, scale, zero)(
        p, codes, scale, zero, ws, *strides, T, tokens_per_split, DIRECT=False, **meta)
    launcher(_split_sum_kernel, (B * Hkv * rows,), p)(ws, out, splits, ROWS=rows, D=D, BLOCK_S=16,
                                                      BLOCK_D=BLOCK_D, num_warps=4)
    return out


@triton_op("kivi::triton_qmatmul_values", mutates_args=())
def triton_qmatmul_values(p: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                          group_size: int) -> torch.Tensor:
    return _qmatmul_values(p, codes, scale, zero, bits, group_size)
