"""Triton quantize / dequantize kernels for KIVI keys (per-channel groups) and values (per-token groups).

Layout and numerics: ``kivi_ops.ops.layout`` (followed exactly; codes, scale and zero match the
reference bit for bit). Shapes: ``B`` batch, ``H`` heads, ``T`` tokens, ``D`` head_dim,
``G`` group_size, ``P = 8 // bits`` codes per byte.

Every launcher runs under ``torch.library.wrap_triton`` so Inductor / AOTInductor can trace into it,
except eager calls on plain tensors, which launch the kernel directly (``_common.launcher``: the wrapper's
higher-order-op dispatch costs 0.25-0.5 ms of host time per call, 3-6x the kernel's GPU time on
an H200); on CPU tensors the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``).

Quantize design (memory-bound; ~11-12 SASS instructions per fp16 element on sm_90, was 44-118):

- A thread holds whole groups: keys, VEC channels x all G tokens; values, all G channels of a
  token. Min/max, packing and the per-group math need no shuffles, shared memory or barriers.
  Every tile is a 2-D pointer tensor [rows kept in the thread, columns over the threads] whose
  columns alone have contiguity > 1, so Triton's coalescing builds that layout in every version
  (3.6 and 3.9 break ties between equally contiguous axes in opposite directions; no tile relies
  on a tie). Reshapes to the logical axes then move no data.
- 16-bit inputs are read as 32-bit words of two channels; on CUDA min/max run on the packed halves
  (``min.NaN.f16x2`` / ``bf16x2`` inline PTX, folded by ptxas into 3-input VHMNMX), then each half
  is converted once. Masked loads exist only in the tail variant (``EVEN`` false).
- No per-element division: ``_encode`` derives the reference's ``floor(div_rn(x - z, s) + 0.5)``
  from the per-group correctly rounded reciprocal plus FMA remainders (Markstein's correction for
  16-bit scales, an exact threshold test for fp32 scales); its docstring says why that is
  bit-identical, and a test checks it at every code boundary for every fp16 and bf16 scale.
- Codes are packed as small float sums (exact) and stored as vectors: keys, a thread's VEC bytes
  per code row; values, a group's G * bits / 8 bytes.
- Launch configurations are a small fixed table (``KEYS_CONFIG``, ``VALUES_CONFIG``, adapted to
  head_dim and group size), compared on the GPU by ``benchmarks/triton_quantize_variants.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._common import cast, cast_round_up, f32, interpreting, launcher, next_pow2, pow2_group, shapes_only




# ----------------------------------------------------------------------------------------------
# shared device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


# Packed min/max of two 16-bit floats per 32-bit word (NaN-propagating): half the instructions of
# float32 FMNMX, and ptxas turns a reduction tree into 3-input VHMNMX. CUDA only (inline PTX).
@triton.jit
def _hmin_f16(a, b):
    return tl.inline_asm_elementwise("min.NaN.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.uint32, is_pure=True, pack=1)


@triton.jit
def _hmax_f16(a, b):
    return tl.inline_asm_elementwise("max.NaN.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.uint32, is_pure=True, pack=1)


@triton.jit
def _hmin_bf16(a, b):
    return tl.inline_asm_elementwise("min.NaN.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.uint32, is_pure=True, pack=1)


@triton.jit
def _hmax_bf16(a, b):
    return tl.inline_asm_elementwise("max.NaN.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.uint32, is_pure=True, pack=1)


@triton.jit
def _words(a, b):
    """Two 16-bit float tensors -> the uint32 words they were loaded from (a in the low half)."""
    return a.to(tl.uint16, bitcast=True).to(tl.uint32) | (b.to(tl.uint16, bitcast=True).to(tl.uint32) << 16)


@triton.jit
def _unpack2(w, DT: tl.constexpr, ASM: tl.constexpr):
    """uint32 words holding two 16-bit floats of ``DT`` (low half first) -> (low, high) as float32.
    With ASM, fp16 converts straight from the word's halves (one HADD2.F32 each; the generic form
    can make LLVM repack the halves with extra PRMTs)."""
    if DT == tl.bfloat16:
        return (w << 16).to(tl.float32, bitcast=True), ((w >> 16) << 16).to(tl.float32, bitcast=True)
    elif ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }",
            "=f,=f,r", [w], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        lo = (w & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (w >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo, hi


@triton.jit
def _word_minmax(w, AX0: tl.constexpr, AX1: tl.constexpr, DT: tl.constexpr):
    """Packed NaN-propagating min and max of the words ``w`` over axes AX0 then AX1 (kept)."""
    if DT == tl.bfloat16:
        lo = tl.reduce(tl.reduce(w, AX0, _hmin_bf16, keep_dims=True), AX1, _hmin_bf16, keep_dims=True)
        hi = tl.reduce(tl.reduce(w, AX0, _hmax_bf16, keep_dims=True), AX1, _hmax_bf16, keep_dims=True)
    else:
        lo = tl.reduce(tl.reduce(w, AX0, _hmin_f16, keep_dims=True), AX1, _hmin_f16, keep_dims=True)
        hi = tl.reduce(tl.reduce(w, AX0, _hmax_f16, keep_dims=True), AX1, _hmax_f16, keep_dims=True)
    return lo, hi


@triton.jit
def _minmax(x, AX0: tl.constexpr, AX1: tl.constexpr, INTERP: tl.constexpr):
    """NaN-propagating float32 min and max of ``x`` over axes AX0 then AX1 (kept)."""
    if INTERP:
        # The interpreter runs a custom combine_fn element by element in Python (minutes for the
        # tests); its tl.min/tl.max are numpy's nanmin/nanmax, so NaN is put back explicitly.
        has_nan = tl.max(tl.max((x != x).to(tl.int32), AX0, keep_dims=True), AX1, keep_dims=True) > 0
        lo = tl.where(has_nan, float("nan"), tl.min(tl.min(x, AX0, keep_dims=True), AX1, keep_dims=True))
        hi = tl.where(has_nan, float("nan"), tl.max(tl.max(x, AX0, keep_dims=True), AX1, keep_dims=True))
    else:
        lo = tl.reduce(tl.reduce(x, AX0, _min_nan, keep_dims=True), AX1, _min_nan, keep_dims=True)
        hi = tl.reduce(tl.reduce(x, AX0, _max_nan, keep_dims=True), AX1, _max_nan, keep_dims=True)
    return lo, hi


@triton.jit
def _pair_minmax(w, xa, xb, AX0: tl.constexpr, AX1: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr,
                 INTERP: tl.constexpr):
    """(lo_a, hi_a, lo_b, hi_b): NaN-propagating float32 min/max over axes AX0 then AX1 (kept) of
    the channel-pair halves xa, xb (float32), or with ASM of the 16-bit words ``w`` holding both:
    packed min/max take half the instructions, and ptxas folds the tree into 3-input VHMNMX."""
    if ASM:
        wlo, whi = _word_minmax(w, AX0, AX1, DT)
        lo_a, lo_b = _unpack2(wlo, DT, ASM)
        hi_a, hi_b = _unpack2(whi, DT, ASM)
    else:
        lo_a, hi_a = _minmax(xa, AX0, AX1, INTERP)
        lo_b, hi_b = _minmax(xb, AX0, AX1, INTERP)
    return lo_a, hi_a, lo_b, hi_b


@triton.jit
def _group_params(lo, hi, QMAX: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """Per-group (scale, zero, ok) from the NaN-propagating float32 ``lo``/``hi``, plus the constants
    ``_encode`` needs: (c, nzc, inv, ns, wsc).

    scale/zero are the STORED values as float32 (scale rounded up to ``OUT_DTYPE`` like
    ``reference.round_up_cast``; zero = lo, exact); a group with a NaN or +-Inf (lo or hi non-finite,
    so s or z non-finite) or a non-finite stored range gets NaN for both. ``ok``: the group encodes
    (scale > 0; False for NaN groups and all-equal groups, whose codes are 0).

    ``_encode`` works on ``d = c * (x - z)`` and ``sc = c * scale`` with ``c`` a power of two: 1, or
    2**64 below 2**-60 and 2**-64 above 2**64 (bf16/fp32 only), so that neither its remainders nor
    1 / sc meet subnormal numbers. That changes neither d / scale nor any rounding that matters (tiny
    scales: the group's elements are < 2**-27, c * x is exact; huge scales: c * (x - z) only turns
    subnormal where d / scale < 2**-120, code 0 either way).
    """
    inf = float("inf")
    s = f32(cast_round_up(tl.math.div_rn(hi - lo, tl.zeros_like(lo) + QMAX), OUT_DTYPE))
    z = f32(cast(lo, OUT_DTYPE))
    bad = ((tl.abs(s) < inf) & (tl.abs(z) < inf)) == 0  # also True for NaN
    s = tl.where(bad, float("nan"), s)
    z = tl.where(bad, float("nan"), z)
    ok = s > 0  # False for NaN and for 0
    if OUT_DTYPE == tl.float16:
        c = tl.full(s.shape, 1.0, tl.float32)  # fp16 scales lie in [2**-24, 65504] (or 0)
    else:
        c = tl.where(s < 2.0**-60, 2.0**64, tl.where(s > 2.0**64, 2.0**-64, 1.0))
    sc = tl.where(ok, s * c, 1.0)  # 1 for groups that do not encode: no inf/NaN warnings
    inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), sc)  # RN(1 / sc): _encode relies on it
    return s, z, ok, c, -(z * c), inv, -sc, sc * -(2.0**-24)


@triton.jit
def _encode(x, c, nzc, inv, ns, wsc, SCALED: tl.constexpr, MARKSTEIN: tl.constexpr):
    """float32 code of float32 ``x`` (>= zero), bit-identical to the reference's
    ``floor(div_rn(x - z, s) + 0.5)`` (unclamped; at most 2**bits - 1 for the group's own elements)
    for a group with ``s > 0`` (others: garbage, the caller zeroes them), with no division per element.

    Notation: d = RN(x - z) >= 0, Q = d / s (real), U = ulp(Q), y = inv = RN(1 / s). The reference's
    code is #{k >= 1 : RN(Q) >= th_k}, th_k the least float with RN(th_k + 0.5) >= k: th_1 = 0.5 - 2**-25
    (RN(th_1 + 0.5) ties up to 1.0) and th_k = k - 0.5 for k >= 2 (there q + 0.5 is exact).

    MARKSTEIN (16-bit scales): q0 = RN(d*y), r = fma(-q0, s, d), q1 = fma(r, y, q0), then the
    reference's own floor(RN(q1 + 0.5)). The code only depends on which side of each th_k the
    quotient falls, so q1 may differ from RN(Q) as long as no th_k's rounding midpoint lies between
    Q and the value q1 rounds. With y s = 1 + e, |e| / (1 - |e|) <= 2**-24:
    - q0 faithful: r is exact and q1 = RN(Q + (Q - q0) e). Every midpoint m between floats is at
      least (U / 2) / S' > 2**-25 U from Q (d - m*s is a nonzero multiple of ulp(s) U / 2, S' the
      significand of s), more than |(Q - q0) e|: q1 = RN(Q) exactly (Markstein's theorem).
    - q0 not faithful (|Q - q0| < 2U): q1 = RN(Q + eps), |eps| < 2**-22 U. Within that distance of a
      midpoint, q0 would be faithful unless Q lies in the top 2**-21 of its binade; the only
      threshold midpoint there is th_1's (just below 0.5), and with s of at most 11 significant bits
      (fp16 / bf16 scales) Q stays at least 2**-26 / S' >= 2**-12 U away from it.
    Both paths were also checked against the reference on every fp16 and bf16 scale with d within
    a few ulps of each code boundary (tests/ops/triton/test_triton_quantize.py).

    Otherwise (float32 scales, any 24-bit s): RN(d * y) is within 2**-15 of Q (< 257), so the code is
    f = floor(RN(d * y)) or f + 1, decided by the one threshold th = th_(f+1) = RN(f + 0.5 - 2**-25):
      RN(Q) >= th  <=>  Q >= th - ulp(th) / 2  (th_k, k >= 2, has an even significand and wins ties;
                                                 for th_1 no float d sits exactly on the midpoint)
                   <=>  X = d - th * s >= w = -(ulp(th) / 2) * s.
    r = fma(th, -s, d) rounds X once; near w, X is a multiple of ulp(th) ulp(s) below 2**24 of them,
    hence exact, and elsewhere rounding keeps the comparison with the float w (monotone): so
    ``r >= w`` is exactly ``X >= w``. ulp(th) / 2 = 2**(exponent(th) - 24) comes from th's bits.
    """
    if SCALED:
        d = tl.fma(x, c, nzc)  # = c * RN(x - z): c is a power of two (see _group_params)
    else:
        d = x + nzc  # x - z
    if MARKSTEIN:
        q0 = d * inv
        q1 = tl.fma(tl.fma(q0, ns, d), inv, q0)
        return tl.floor(q1 + 0.5)
    else:
        f = tl.floor(d * inv)
        th = f + 0.4999999701976776  # 0.5 - 2**-25: th_1 for f == 0, rounds to f + 0.5 for f >= 1
        w = (th.to(tl.uint32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True) * wsc
        r = tl.fma(th, ns, d)
        return f + tl.where(r >= w, 1.0, 0.0)


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
# Launch configurations. A thread always holds whole groups (see the kernels), so a configuration
# only sets how many bytes a thread loads per vector, how much work a program gets, and its warps.
# Chosen on the H200 with benchmarks/triton_quantize_variants.py; every configuration is
# bit-exact, only speed differs. Keys: vec_bytes = bytes of one token's channels per thread (the
# group's G tokens all stay in the thread: 8 -> 4 fp16 channels x 32 tokens = 128 values; the
# default halves it for larger groups, down to 2 channels).
# ----------------------------------------------------------------------------------------------

# Measured (H200, Triton 3.6, [1, 32, 32768, 128] fp16, G 32, kernel time from a CUDA graph, % of the
# 4.27 TB/s copy bandwidth): keys k1 91.4 % (2b) / 91.9 % (4b), every other keys layout within 1 %
# of it except 8 warps (81-83 %) and reload (79 %); values with 2 warps (v2) 99.2 % / 99.9 %,
# 1 warp 91.0 % / 99.0 %. Eager calls land at 85-93 % (host launch cost partly hidden).
KEYS_CONFIG = dict(vec_bytes=8, gpp=1, num_warps=1)
VALUES_CONFIG = dict(vec_bytes=16, block_n=16, num_warps=2)
# Triton's interpreter pays ~30 ms per program whatever its size: fewer, bigger programs there.
INTERP_KEYS_CONFIG = dict(vec_bytes=8, gpp=16, num_warps=1)
INTERP_VALUES_CONFIG = dict(vec_bytes=16, block_n=64, num_warps=1)


def _words_ok(t: torch.Tensor, D: int) -> bool:
    """16-bit inputs can be read as 32-bit words of two channels: needs 4-byte aligned rows (even D,
    even storage offset on an allocator-aligned storage; no data_ptr(), which fake tensors lack)."""
    return t.element_size() == 2 and D % 2 == 0 and t.storage_offset() % 2 == 0


def _asm_ok(t: torch.Tensor) -> bool:
    """Inline PTX (packed 16-bit min/max) runs only compiled on NVIDIA GPUs."""
    return t.element_size() == 2 and t.device.type == "cuda" and torch.version.hip is None and not interpreting(t)


# How the layouts are obtained: every tile is a 2-D pointer tensor [in-thread rows, columns] whose
# columns are the only axis with contiguity > 1 (declared with tl.max_contiguous, never more than
# the truth). Triton's coalescing then makes the columns the fast axis in every version (it breaks
# ties between axes of equal contiguity in opposite directions in 3.6 and 3.9, so no tile relies on
# a tie), gives a thread one vector of columns, and spends all the threads on columns before rows:
# the rows (a group's other tokens or channels) stay in the thread. Reshapes to the logical axes
# then move no data.


# ----------------------------------------------------------------------------------------------
# quantize keys: per-channel groups of G tokens
# ----------------------------------------------------------------------------------------------


@triton.jit
def _keys_tile(k_ptr, g0, n_groups, D: tl.constexpr, GROUP: tl.constexpr, P: tl.constexpr, GPP: tl.constexpr,
               DB: tl.constexpr, VEC: tl.constexpr, EVEN: tl.constexpr, WORDS: tl.constexpr, ASM: tl.constexpr):
    """GPP token groups as (w, xa, xb), each [G // P, P, GPP, DB, VEC // 2] (token r * P + j of group
    q, channel pair (c * VEC + 2m, + 1)): the 32-bit words holding both channels (16-bit input;
    else unused) and the even / odd channels as float32. Loaded as rows = the G tokens, columns =
    (group, channels)."""
    VW: tl.constexpr = VEC // 2
    t = tl.arange(0, GROUP)[:, None]
    if WORDS:  # 16-bit pairs read as 32-bit words, VW >= 2 of them per thread
        col = tl.arange(0, GPP * DB * VW)[None, :]
        q = col // (DB * VW)
        wc = col % (DB * VW)
        ptrs = k_ptr.to(tl.pointer_type(tl.uint32)) + g0 * (GROUP * D // 2) + (q * (GROUP * D // 2) + t * (D // 2) + wc)
        ptrs = tl.max_contiguous(ptrs, [1, VW])
        if EVEN:
            w = tl.load(ptrs)
        else:
            w = tl.load(ptrs, mask=((g0 + q) < n_groups) & (wc < D // 2), other=0)
        w = tl.reshape(w, [GROUP // P, P, GPP, DB, VW])
        xa, xb = _unpack2(w, k_ptr.dtype.element_ty, ASM)
    else:
        col = tl.arange(0, GPP * DB * VEC)[None, :]
        q = col // (DB * VEC)
        ch = col % (DB * VEC)
        ptrs = tl.max_contiguous(k_ptr + g0 * (GROUP * D) + (q * (GROUP * D) + t * D + ch), [1, VEC])
        if EVEN:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=((g0 + q) < n_groups) & (ch < D), other=0.0)
        a, b = tl.split(tl.reshape(x, [GROUP // P, P, GPP, DB, VW, 2]))
        xa, xb = f32(a), f32(b)
        if ASM:  # only for the packed min/max
            w = _words(a, b)
        else:
            w = xa
    return w, xa, xb


@triton.jit
def _quantize_keys_kernel(
    k_ptr,  # [n_groups * G, D]        float (k as [B*H*T, D]; T % G == 0)
    codes_ptr,  # [n_groups * G // P, D]  uint8
    scale_ptr,  # [n_groups, D]         k.dtype
    zero_ptr,  # [n_groups, D]          k.dtype
    n_groups,  # B*H*T // G
    D: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    GPP: tl.constexpr,  # token groups per program
    VEC: tl.constexpr,  # channels per thread vector, even
    DB: tl.constexpr,  # next_pow2(cdiv(D, VEC))
    EVEN: tl.constexpr,  # n_groups % GPP == 0 and DB * VEC == D: no masks (a masked load costs 2 more instructions)
    WORDS: tl.constexpr,  # 16-bit input loaded as 32-bit words of two channels (>= 2 per thread)
    ASM: tl.constexpr,  # packed 16-bit min/max by inline PTX
    INTERP: tl.constexpr,  # running in Triton's interpreter
    RELOAD: tl.constexpr,  # load the tile again to encode it (G * VEC values per thread would spill)
):
    # grid: cdiv(n_groups, GPP); one program = GPP consecutive token groups x all D channels. A
    # thread holds VEC channels x all G tokens of a group: min/max over tokens and the packing of
    # P tokens per byte need no shuffles. Channels 2m ("a") and 2m + 1 ("b") are separate groups,
    # handled side by side (for 16-bit input they share the 32-bit words of the packed min/max).
    P: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    VW: tl.constexpr = VEC // 2
    CW: tl.constexpr = GPP * DB * VEC
    DT: tl.constexpr = scale_ptr.dtype.element_ty
    g0 = tl.program_id(0).to(tl.int64) * GPP
    w, xa, xb = _keys_tile(k_ptr, g0, n_groups, D, GROUP, P, GPP, DB, VEC, EVEN, WORDS, ASM)  # [G//P, P, GPP, DB, VW]

    lo_a, hi_a, lo_b, hi_b = _pair_minmax(w, xa, xb, 1, 0, DT, ASM, INTERP)  # [1, 1, GPP, DB, VW]
    s_a, z_a, ok_a, c_a, nzc_a, inv_a, ns_a, wsc_a = _group_params(lo_a, hi_a, QMAX, DT)
    s_b, z_b, ok_b, c_b, nzc_b, inv_b, ns_b, wsc_b = _group_params(lo_b, hi_b, QMAX, DT)
    # scale/zero: channels (2m, 2m + 1) side by side, one vector store per thread
    col = tl.arange(0, CW)
    q1 = col // (DB * VEC)
    ch1 = col % (DB * VEC)
    sz_ptr_off = g0 * D + (q1 * D + ch1)
    sz_mask = None if EVEN else ((g0 + q1) < n_groups) & (ch1 < D)
    tl.store(tl.max_contiguous(scale_ptr + sz_ptr_off, [VEC]), cast(tl.reshape(tl.join(s_a, s_b), [CW]), DT),
             mask=sz_mask)
    tl.store(tl.max_contiguous(zero_ptr + sz_ptr_off, [VEC]), cast(tl.reshape(tl.join(z_a, z_b), [CW]), DT),
             mask=sz_mask)

    if RELOAD:
        w, xa, xb = _keys_tile(k_ptr, g0, n_groups, D, GROUP, P, GPP, DB, VEC, EVEN, WORDS, ASM)
    SCALED: tl.constexpr = DT != tl.float16
    MARK: tl.constexpr = DT != tl.float32
    code_a = _encode(xa, c_a, nzc_a, inv_a, ns_a, wsc_a, SCALED, MARK)
    code_b = _encode(xb, c_b, nzc_b, inv_b, ns_b, wsc_b, SCALED, MARK)
    # pack: token r * P + j of channel d -> byte (row r, d), bits [j * BITS, ...). Small integers:
    # exact in float32. A thread stores its VEC bytes of each row as one vector.
    wts = (1 << (tl.arange(0, P) * BITS)).to(tl.float32)[None, :, None, None, None]
    byte_a = tl.where(tl.reshape(ok_a, [1, GPP, DB, VW]), tl.sum(code_a * wts, axis=1), 0.0)  # [G // P, GPP, DB, VW]
    byte_b = tl.where(tl.reshape(ok_b, [1, GPP, DB, VW]), tl.sum(code_b * wts, axis=1), 0.0)
    byte = tl.reshape(tl.join(byte_a, byte_b), [GROUP // P, CW]).to(tl.uint8)
    r2 = tl.arange(0, GROUP // P)[:, None]
    col2 = tl.arange(0, CW)[None, :]
    q2 = col2 // (DB * VEC)
    ch2 = col2 % (DB * VEC)
    c_ptrs = codes_ptr + g0 * (GROUP // P * D) + (q2 * (GROUP // P * D) + r2 * D + ch2)
    tl.store(tl.max_contiguous(c_ptrs, [1, VEC]), byte, mask=None if EVEN else ((g0 + q2) < n_groups) & (ch2 < D))


def _keys_launch(k: torch.Tensor, D: int, G: int, n_groups: int, cfg: dict | None = None) -> dict:
    elem = k.element_size()
    if cfg is None:
        cfg = dict(INTERP_KEYS_CONFIG if interpreting(k) else KEYS_CONFIG)
        while G * (cfg["vec_bytes"] // elem) > 128 and cfg["vec_bytes"] // elem > 2:
            cfg["vec_bytes"] //= 2  # at most 128 values per thread
        # one channel vector per thread: as many warps as the head_dim's vectors need
        cfg["num_warps"] = min(8, max(cfg["num_warps"], next_pow2(triton.cdiv(D, max(2, cfg["vec_bytes"] // elem))) // 32))
    vec = min(max(2, next_pow2(cfg["vec_bytes"] // elem)), max(2, 16 // elem))  # even, at most 16 bytes
    db = next_pow2(triton.cdiv(D, vec))
    nw = cfg["num_warps"]
    # enough groups per program that every thread owns columns (otherwise the coalescing would put
    # some threads on the token rows, i.e. split groups)
    gpp = max(next_pow2(cfg["gpp"]), 32 * nw // db)
    # values a thread would keep: G tokens x VEC channels per vector it owns; reload beyond 128
    # (the registers would spill); "reload" in cfg forces either way
    reload = cfg.get("reload")
    if reload is None:
        reload = G * vec * max(1, db * gpp // (32 * nw)) > 128
    return dict(VEC=vec, DB=db, GPP=gpp, EVEN=n_groups % gpp == 0 and db * vec == D,
                WORDS=vec >= 4 and _words_ok(k, D), ASM=cfg.get("asm", True) and _asm_ok(k),
                INTERP=interpreting(k), RELOAD=bool(reload), num_warps=nw)


def _quantize_keys(k: torch.Tensor, bits: int, group_size: int, cfg: dict | None = None):
    """(codes, scale, zero); ``cfg`` overrides ``KEYS_CONFIG`` (benchmarks pass their candidates)."""
    return _launch_quantize_keys(k, bits, group_size, cfg)[:3]


def _launch_quantize_keys(k: torch.Tensor, bits: int, group_size: int, cfg: dict | None = None):
    """(codes, scale, zero, compiled kernel or None): the kernel handle gives n_regs / n_spills."""
    B, H, T, D = k.shape
    G = pow2_group(group_size)
    P = 8 // bits
    k = k.contiguous()
    codes = torch.empty((B, H, T // P, D), dtype=torch.uint8, device=k.device)
    scale = torch.empty((B, H, T // G, D), dtype=k.dtype, device=k.device)
    zero = torch.empty_like(scale)
    if k.numel() == 0 or shapes_only(k, _quantize_keys_kernel):
        return codes, scale, zero, None
    n_groups = B * H * (T // G)
    lc = _keys_launch(k, D, G, n_groups, cfg)
    grid = (triton.cdiv(n_groups, lc["GPP"]),)
    kern = launcher(_quantize_keys_kernel, grid, k, codes, scale, zero)(
        k, codes, scale, zero, n_groups, D=D, BITS=bits, GROUP=G, **lc)
    return codes, scale, zero, kern


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
    D: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,  # tokens per program
    VEC: tl.constexpr,  # channels per thread vector (even, divides G, a whole number of code bytes)
    NGB: tl.constexpr,  # next_pow2(D // G)
    EVEN: tl.constexpr,  # N % BLOCK_N == 0 and NGB * G == D: no masks
    WORDS: tl.constexpr,  # 16-bit input loaded as 32-bit words of two channels (>= 2 per thread)
    ASM: tl.constexpr,  # packed 16-bit min/max by inline PTX
    INTERP: tl.constexpr,  # running in Triton's interpreter
):
    # grid: cdiv(N, BLOCK_N); one program = BLOCK_N tokens x all D channels. The tile is loaded as
    # rows = the G // VEC vectors of a group, columns = (token, group, VEC channels): a thread holds
    # whole groups, so min/max and packing need no shuffles (the old [BLOCK_N, D] tile spread a
    # group over 4 lanes and reshaped through shared memory). Channels 2m ("a") and 2m + 1 ("b")
    # belong to the same group here.
    P: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    NG: tl.constexpr = D // GROUP
    VW: tl.constexpr = VEC // 2
    CW: tl.constexpr = BLOCK_N * NGB * VEC
    DT: tl.constexpr = scale_ptr.dtype.element_ty
    n0 = tl.program_id(0).to(tl.int64) * BLOCK_N
    i2 = tl.arange(0, GROUP // VEC)[:, None]
    if WORDS:  # 16-bit pairs read as 32-bit words, VW >= 2 of them per thread
        col = tl.arange(0, BLOCK_N * NGB * VW)[None, :]
        n = col // (NGB * VW)
        g = (col // VW) % NGB
        ptrs = v_ptr.to(tl.pointer_type(tl.uint32)) + n0 * (D // 2) + (n * (D // 2) + g * (GROUP // 2) + i2 * VW + col % VW)
        ptrs = tl.max_contiguous(ptrs, [1, VW])
        if EVEN:
            w = tl.load(ptrs)
        else:
            w = tl.load(ptrs, mask=((n0 + n) < N) & (g < NG), other=0)
        w = tl.reshape(w, [GROUP // VEC, BLOCK_N, NGB, VW])
        xa, xb = _unpack2(w, DT, ASM)
    else:
        col = tl.arange(0, CW)[None, :]
        n = col // (NGB * VEC)
        g = (col // VEC) % NGB
        ptrs = tl.max_contiguous(v_ptr + n0 * D + (n * D + g * GROUP + i2 * VEC + col % VEC), [1, VEC])
        if EVEN:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=((n0 + n) < N) & (g < NG), other=0.0)
        a, b = tl.split(tl.reshape(x, [GROUP // VEC, BLOCK_N, NGB, VW, 2]))  # [G // VEC, BLOCK_N, NGB, VW]
        xa, xb = f32(a), f32(b)
        if ASM:  # only for the packed min/max
            w = _words(a, b)
        else:
            w = xa

    lo_a, hi_a, lo_b, hi_b = _pair_minmax(w, xa, xb, 3, 0, DT, ASM, INTERP)  # [1, BLOCK_N, NGB, 1]
    s, z, ok, c, nzc, inv, ns, wsc = _group_params(_min_nan(lo_a, lo_b), _max_nan(hi_a, hi_b), QMAX, DT)
    grp = tl.arange(0, BLOCK_N * NGB)  # one group per thread: one scale and one zero
    n1 = grp // NGB
    g1 = grp % NGB
    sz_off = n0 * NG + (n1 * NG + g1)
    sz_mask = None if EVEN else ((n0 + n1) < N) & (g1 < NG)
    tl.store(scale_ptr + sz_off, cast(tl.reshape(s, [BLOCK_N * NGB]), DT), mask=sz_mask)
    tl.store(zero_ptr + sz_off, cast(tl.reshape(z, [BLOCK_N * NGB]), DT), mask=sz_mask)

    SCALED: tl.constexpr = DT != tl.float16
    MARK: tl.constexpr = DT != tl.float32
    code_a = _encode(xa, c, nzc, inv, ns, wsc, SCALED, MARK)
    code_b = _encode(xb, c, nzc, inv, ns, wsc, SCALED, MARK)
    # pack: channel c * P + j -> byte c, bits [j * BITS, ...). A pair (2m, 2m + 1) is
    # code_a + code_b << BITS; PPW pairs make one stored word (16 bits where a vector holds that
    # many codes, else a byte). Small integers: exact in float32.
    WBITS: tl.constexpr = 16 if VEC * BITS >= 16 else 8
    PPW: tl.constexpr = WBITS // (2 * BITS)
    KW: tl.constexpr = VW // PPW  # words per vector
    pair = tl.reshape(code_a + code_b * (1 << BITS), [GROUP // VEC, BLOCK_N, NGB, KW, PPW])
    wts = (1 << (tl.arange(0, PPW) * (2 * BITS))).to(tl.float32)[None, None, None, None, :]
    word = tl.where(ok, tl.sum(pair * wts, axis=4), 0.0)  # [G // VEC, BLOCK_N, NGB, KW]
    WPT: tl.constexpr = D * BITS // WBITS  # words per token
    GW: tl.constexpr = GROUP * BITS // WBITS  # words per group, contiguous in memory
    w_ptr = codes_ptr.to(tl.pointer_type(tl.uint16)) if WBITS == 16 else codes_ptr
    wdt: tl.constexpr = tl.uint16 if WBITS == 16 else tl.uint8
    if GW * WBITS <= 128:
        # a group's words are one contiguous vector: store them as such (rows = groups)
        word = tl.reshape(tl.permute(word, (1, 2, 0, 3)), [BLOCK_N * NGB, GW])
        grp2 = tl.arange(0, BLOCK_N * NGB)[:, None]
        n3 = grp2 // NGB
        g3 = grp2 % NGB
        offs = n3 * WPT + g3 * GW + tl.arange(0, GW)[None, :]
        mask = None if EVEN else ((n0 + n3) < N) & (g3 < NG)
        tl.store(tl.max_contiguous(w_ptr + n0 * WPT + offs, [1, GW]), word.to(wdt), mask=mask)
    else:
        # longer groups: the words of each vector (rows = vectors of a group)
        word = tl.reshape(word, [GROUP // VEC, BLOCK_N * NGB * KW])
        col3 = tl.arange(0, BLOCK_N * NGB * KW)[None, :]
        n3 = col3 // (NGB * KW)
        g3 = (col3 // KW) % NGB
        offs = n3 * WPT + g3 * GW + i2 * KW + col3 % KW
        mask = None if EVEN else ((n0 + n3) < N) & (g3 < NG)
        tl.store(tl.max_contiguous(w_ptr + n0 * WPT + offs, [1, KW]), word.to(wdt), mask=mask)


def _values_launch(v: torch.Tensor, D: int, G: int, bits: int, N: int, cfg: dict | None = None) -> dict:
    cfg = (INTERP_VALUES_CONFIG if interpreting(v) else VALUES_CONFIG) if cfg is None else cfg
    elem = v.element_size()
    # even, a whole number of code bytes, at most 16 bytes (one vector load) where possible
    vec = min(G, max(min(next_pow2(cfg["vec_bytes"] // elem), 16 // elem), 8 // bits, 2))
    ngb = next_pow2(D // G)
    nw = cfg["num_warps"]
    # at least one whole group per thread (fewer tokens would spread a group over lanes)
    block_n = max(next_pow2(cfg["block_n"]), 32 * nw // ngb)
    block_n = max(1, min(block_n, next_pow2(N)))
    return dict(VEC=vec, NGB=ngb, BLOCK_N=block_n, EVEN=N % block_n == 0 and ngb * G == D,
                WORDS=vec >= 4 and _words_ok(v, D), ASM=cfg.get("asm", True) and _asm_ok(v),
                INTERP=interpreting(v), num_warps=nw)


def _quantize_values(v: torch.Tensor, bits: int, group_size: int, cfg: dict | None = None):
    """(codes, scale, zero); ``cfg`` overrides ``VALUES_CONFIG`` (benchmarks pass their candidates)."""
    return _launch_quantize_values(v, bits, group_size, cfg)[:3]


def _launch_quantize_values(v: torch.Tensor, bits: int, group_size: int, cfg: dict | None = None):
    """(codes, scale, zero, compiled kernel or None)."""
    B, H, T, D = v.shape
    G = pow2_group(group_size)
    P = 8 // bits
    v = v.contiguous()
    codes = torch.empty((B, H, T, D // P), dtype=torch.uint8, device=v.device)
    scale = torch.empty((B, H, T, D // G), dtype=v.dtype, device=v.device)
    zero = torch.empty_like(scale)
    N = B * H * T
    if N == 0 or shapes_only(v, _quantize_values_kernel):
        return codes, scale, zero, None
    lc = _values_launch(v, D, G, bits, N, cfg)
    grid = (triton.cdiv(N, lc["BLOCK_N"]),)
    kern = launcher(_quantize_values_kernel, grid, v, codes, scale, zero)(
        v, codes, scale, zero, N, D=D, BITS=bits, GROUP=G, **lc)
    return codes, scale, zero, kern


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
    launcher(_dequantize_keys_kernel, grid, codes, scale, zero, out)(
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
    launcher(_dequantize_values_kernel, grid, codes, scale, zero, out)(
        codes, scale, zero, out, N, D,
        BITS=bits, GROUP=G, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, PTX_MUL=_ptx_mul(scale), num_warps=4,
    )
    return out


@triton_op("kivi::triton_dequantize_values", mutates_args=())
def triton_dequantize_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    return _dequantize_values(codes, scale, zero, bits, group_size)
