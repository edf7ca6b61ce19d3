"""Triton fused decode attention over a KIVI cache (flash-decoding).

keys = [dequant(Kq) (Tk tokens) ‖ k_residual (T - Tk)], values = [dequant(Vq) (Tv) ‖ v_residual (T - Tv)];
token t takes its key from the packed part when t < Tk, else ``k_residual[t - Tk]``, and its value from
the packed part when t < Tv, else ``v_residual[t - Tv]``. Semantics: ``reference.decode_attention``.

Kernel 1 (grid ``(B*Hkv, S)``): the T tokens are split into S chunks; one program takes one chunk of
one KV head for all ``n_rep * M`` query rows of that head (rows padded to >= 16 for ``tl.dot``), runs
an online softmax in float32 (log2 domain) and writes the unnormalised partial ``(m, l, acc)`` to a
float32 workspace. Blocks lying wholly inside ``[0, min(Tk, Tv))`` and before ``lengths[b]`` take the
fast path (contiguous code tiles unpacked in registers, no masks); the rest (the residual tail, the
ragged end) take a masked gather path. Kernel 2 (grid ``(B*Hkv, rows / BLOCK_R)``) merges the S
partials. With one split, kernel 1 writes the normalised output itself.

Numerics: float16 caches are dequantized in float16 (one fma rounding) and multiplied on float16
tensor cores; bfloat16 caches use float32 operands on TF32 tensor cores (bfloat16 operands cost 1%
relative error with outlier channels); float32 uses 3xTF32. Accumulation and softmax are float32.

Layout: ``kivi_ops.ops.layout``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._common import (batch_head_strides, cast, dot_mode, f32, interpreting, launcher, next_pow2, num_sms,
                      pow2_group, rows_contiguous, shapes_only)
from ._tiles import DOT_FP16, load_keys_mixed, load_keys_tile, load_values_mixed, load_values_tile, mma, to_dot

_LOG2E = 1.4426950408889634
_WAVES = 8  # target programs per SM for the split kernel (several waves: a short last wave)


@triton.jit
def _online_softmax_step(qd, k, v, m_i, l_i, acc, qk_scale, valid, MASKED: tl.constexpr,
                         DOT: tl.constexpr, INTERP: tl.constexpr):
    """One block: scores = q k^T * qk_scale (log2 domain), online-softmax update of (m, l, acc)."""
    s = mma(qd, tl.trans(to_dot(k, DOT, INTERP)), tl.zeros([qd.shape[0], k.shape[0]], dtype=tl.float32),
            DOT, INTERP)  # [ROWS_PAD, BLOCK_T]
    s = s * qk_scale
    if MASKED:
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing valid yet stays at 0
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = mma(to_dot(p, DOT, INTERP), to_dot(v, DOT, INTERP), acc * alpha[:, None], DOT, INTERP)
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [B, Hq, M, D] = [B*Hkv, ROWS, D] contiguous     ROWS = n_rep * M
    kc_ptr,  # [B, Hkv, Tk // PK, D] uint8      the cache: rows contiguous, batch/head strides below
    ks_ptr,  # [B, Hkv, Tk // G, D]
    kz_ptr,  # [B, Hkv, Tk // G, D]
    vc_ptr,  # [B, Hkv, Tv, D // PV] uint8
    vs_ptr,  # [B, Hkv, Tv, D // G]
    vz_ptr,  # [B, Hkv, Tv, D // G]
    kr_ptr,  # [B, Hkv, T - Tk, D]
    vr_ptr,  # [B, Hkv, T - Tv, D]
    len_ptr,  # [B] int32/int64 (read only when HAS_LEN)
    out_ptr,  # DIRECT: [B*Hkv, ROWS, D] q.dtype; else acc workspace [B*Hkv, S, ROWS, D] float32
    ml_ptr,  # [B*Hkv, S, ROWS, 2] float32 (m, l); unused when DIRECT
    kc_sb, kc_sh, ks_sb, ks_sh, kz_sb, kz_sh,  # (batch, head) strides of the eight cache tensors
    vc_sb, vc_sh, vs_sb, vs_sh, vz_sb, vz_sh,
    kr_sb, kr_sh, vr_sb, vr_sh,
    Hkv,
    Tk,
    Tv,
    T,
    tokens_per_split,  # multiple of BLOCK_T
    qk_scale,  # scale * log2(e)
    ROWS: tl.constexpr,
    ROWS_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KBITS: tl.constexpr,
    VBITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HAS_LEN: tl.constexpr,
    DIRECT: tl.constexpr,
    DOT: tl.constexpr,
    INTERP: tl.constexpr,
):
    # grid: (B*Hkv, S)
    PK: tl.constexpr = 8 // KBITS
    EVEN_D: tl.constexpr = BLOCK_D == D
    F16: tl.constexpr = DOT == DOT_FP16  # float16 cache: dequantize straight to the dot's float16
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = bh // Hkv
    h = bh % Hkv

    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as float64
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, T)
    if HAS_LEN:
        end = tl.minimum(end, tl.load(len_ptr + b).to(tl.int32))
    end = tl.maximum(end, start)
    # fast blocks: wholly valid and wholly packed for both K and V
    fast_end = tl.minimum(end, tl.minimum(Tk, Tv))
    fast_end = tl.maximum(start + ((fast_end - start) // BLOCK_T) * BLOCK_T, start)

    offs_i = tl.arange(0, ROWS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    imask = offs_i < ROWS
    q = f32(tl.load(q_ptr + (bh * ROWS + offs_i)[:, None] * D + offs_d[None, :],
                    mask=imask[:, None] & (offs_d < D)[None, :], other=0.0))
    qd = to_dot(q, DOT, INTERP)  # [ROWS_PAD, BLOCK_D]

    kc = kc_ptr + b * kc_sb + h * kc_sh
    ks = ks_ptr + b * ks_sb + h * ks_sh
    kz = kz_ptr + b * kz_sb + h * kz_sh
    vc = vc_ptr + b * vc_sb + h * vc_sh
    vs = vs_ptr + b * vs_sb + h * vs_sh
    vz = vz_ptr + b * vz_sb + h * vz_sh
    kr = kr_ptr + b * kr_sb + h * kr_sh
    vr = vr_ptr + b * vr_sb + h * vr_sh

    m_i = tl.full([ROWS_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS_PAD], dtype=tl.float32)
    acc = tl.zeros([ROWS_PAD, BLOCK_D], dtype=tl.float32)
    dummy = tl.arange(0, BLOCK_T) >= 0

    for t0 in range(start, fast_end, BLOCK_T):
        k = load_keys_tile(kc, ks, kz, t0 // PK, Tk // PK, D, KBITS, GROUP, BLOCK_T, BLOCK_D, False, EVEN_D, F16)
        v = load_values_tile(vc, vs, vz, t0, Tv, D, VBITS, GROUP, BLOCK_T, BLOCK_D, False, EVEN_D, F16)
        m_i, l_i, acc = _online_softmax_step(qd, k, v, m_i, l_i, acc, qk_scale, dummy, False, DOT, INTERP)

    # tail (at most a few blocks): not software-pipelined, its gathers would be staged in shared memory
    for t0 in tl.range(fast_end, end, BLOCK_T, num_stages=1):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        valid = offs_t < end
        k = load_keys_mixed(kc, ks, kz, kr, offs_t, valid, Tk, D, KBITS, GROUP, BLOCK_D)
        v = load_values_mixed(vc, vs, vz, vr, offs_t, valid, Tv, D, VBITS, GROUP, BLOCK_D)
        m_i, l_i, acc = _online_softmax_step(qd, k, v, m_i, l_i, acc, qk_scale, valid, True, DOT, INTERP)

    omask = imask[:, None] & (offs_d < D)[None, :]
    if DIRECT:
        o = acc / tl.where(imask, l_i, 1.0)[:, None]  # l = 0 (nothing valid) gives NaN, as the reference does
        tl.store(out_ptr + (bh * ROWS + offs_i)[:, None] * D + offs_d[None, :], cast(o, out_ptr.dtype.element_ty),
                 mask=omask)
    else:
        row = (bh * n_splits + split) * ROWS + offs_i  # [ROWS_PAD]
        tl.store(out_ptr + row[:, None] * D + offs_d[None, :], acc, mask=omask)
        tl.store(ml_ptr + row * 2, m_i, mask=imask)
        tl.store(ml_ptr + row * 2 + 1, l_i, mask=imask)


@triton.jit
def _decode_combine_kernel(
    acc_ptr,  # [B*Hkv, S, ROWS, D] float32
    ml_ptr,  # [B*Hkv, S, ROWS, 2] float32
    out_ptr,  # [B, Hq, M, D] = [B*Hkv, ROWS, D]  q.dtype
    S,
    ROWS: tl.constexpr,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid: (B*Hkv, cdiv(ROWS, BLOCK_R)): BLOCK_R query rows of one KV head, merging their S partials
    # BLOCK_S splits at a time (independent loads) with a running max, as kernel 1 does over tokens
    bh = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    offs_s = tl.arange(0, BLOCK_S)  # [BS]
    offs_d = tl.arange(0, BLOCK_D)
    imask = offs_i < ROWS
    dmask = offs_d < D
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + offs_s
        row = (bh * S + ss[None, :]) * ROWS + offs_i[:, None]  # [BR, BS]
        msk = imask[:, None] & (ss < S)[None, :]
        m = tl.load(ml_ptr + row * 2, mask=msk, other=float("-inf"))
        l = tl.load(ml_ptr + row * 2 + 1, mask=msk, other=0.0)
        a = tl.load(acc_ptr + row[:, :, None] * D + offs_d[None, None, :], mask=msk[:, :, None] & dmask[None, None, :],
                    other=0.0)  # [BR, BS, BD]
        m_new = tl.maximum(m_i, tl.max(m, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)  # 0 while nothing seen
        w = tl.math.exp2(m - m_use[:, None])  # 0 for empty splits (m = -inf)
        l_i = l_i * alpha + tl.sum(w * l, axis=1)
        acc = acc * alpha[:, None] + tl.sum(a * w[:, :, None], axis=1)
        m_i = m_new
    o = acc / tl.where(imask, l_i, 1.0)[:, None]  # l = 0 (no valid token at all) gives NaN, as the reference does
    omask = imask[:, None] & dmask[None, :]
    tl.store(out_ptr + (bh * ROWS + offs_i)[:, None] * D + offs_d[None, :], cast(o, out_ptr.dtype.element_ty),
             mask=omask)


def _config(D: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_T, num_warps, num_stages) by head_dim and dtype: fixed configs, no autotuning yet (the
    dequantized K and V tiles of BLOCK_T x D live in registers; BLOCK_T is capped at the group size).
    Software pipelining (num_stages > 1) stages the gathers in shared memory, overflowing it for
    float32 inputs, and did not pay off for the others."""
    # measured on an H200 (K2V2, G=32, D=128, CUDA-graph timing): 32 tokens, 2 warps, no pipelining,
    # ~8 programs per SM was the best of {16, 32} x {2, 4, 8} warps x {1, 2} stages x {2, 4, 8} waves
    return 32, 2, 1


def _decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_residual, v_residual,
                      k_bits: int, v_bits: int, group_size: int, scale: float, lengths: Optional[torch.Tensor],
                      num_splits: int = 0):
    B, Hq, M, D = q.shape
    Hkv = k_codes.shape[1]
    Tk = k_codes.shape[2] * (8 // k_bits)
    Tv = v_codes.shape[2]
    T = Tk + k_residual.shape[2]
    G = pow2_group(group_size)
    rows = (Hq // Hkv) * M
    q = q.contiguous()
    cache = [rows_contiguous(t) for t in (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_residual, v_residual)]
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    if T == 0:  # attention over nothing: softmax of an empty row, matmul gives zeros
        return out.zero_()
    if shapes_only(q, _decode_split_kernel):
        return out
    has_len = lengths is not None
    len_arg = lengths.contiguous() if has_len else q  # any pointer; not read

    BLOCK_D = next_pow2(D)
    BLOCK_T, num_warps, num_stages = _config(BLOCK_D, q.dtype)
    BLOCK_T = min(BLOCK_T, G)  # a key tile lies inside one group
    n_blocks = triton.cdiv(T, BLOCK_T)
    if num_splits <= 0:
        # several waves of programs, so the last partial wave costs little
        num_splits = max(1, min(n_blocks, triton.cdiv(num_sms(q.device) * _WAVES, B * Hkv)))
    num_splits = min(num_splits, n_blocks)
    tokens_per_split = triton.cdiv(n_blocks, num_splits) * BLOCK_T
    num_splits = triton.cdiv(T, tokens_per_split)

    meta = dict(ROWS=rows, ROWS_PAD=max(16, next_pow2(rows)), D=D, BLOCK_D=BLOCK_D, KBITS=k_bits, VBITS=v_bits,
                GROUP=G, BLOCK_T=BLOCK_T, HAS_LEN=has_len, DOT=dot_mode(q.dtype), INTERP=interpreting(q),
                num_warps=num_warps, num_stages=num_stages)
    args = (q, *cache, len_arg)
    scalars = (*batch_head_strides(*cache), Hkv, Tk, Tv, T, tokens_per_split, float(scale) * _LOG2E)
    if num_splits == 1:
        launcher(_decode_split_kernel, (B * Hkv, 1), *args)(*args, out, out, *scalars, DIRECT=True, **meta)
        return out
    ws_acc = torch.empty((B * Hkv, num_splits, rows, D), dtype=torch.float32, device=q.device)
    ws_ml = torch.empty((B * Hkv, num_splits, rows, 2), dtype=torch.float32, device=q.device)
    launcher(_decode_split_kernel, (B * Hkv, num_splits), *args)(*args, ws_acc, ws_ml, *scalars, DIRECT=False, **meta)
    # one row per program on the GPU (parallelism); blocks of rows under the interpreter (fewer programs)
    block_r = min(next_pow2(rows), 16) if interpreting(q) else 1
    launcher(_decode_combine_kernel, (B * Hkv, triton.cdiv(rows, block_r)), q)(
        ws_acc, ws_ml, out, num_splits, ROWS=rows, D=D, BLOCK_R=block_r, BLOCK_S=16 if block_r > 1 else 32,
        BLOCK_D=BLOCK_D, num_warps=4)
    return out


@triton_op("kivi::triton_decode_attention", mutates_args=())
def triton_decode_attention(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    k_residual: torch.Tensor,
    v_residual: torch.Tensor,
    k_bits: int,
    v_bits: int,
    group_size: int,
    scale: float,
    lengths: Optional[torch.Tensor] = None,
    num_splits: int = 0,
) -> torch.Tensor:
    """``num_splits`` 0 picks the split count from the GPU's size; a positive value forces it (tests)."""
    return _decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_residual, v_residual,
                             k_bits, v_bits, group_size, scale, lengths, num_splits)
