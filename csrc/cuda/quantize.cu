// CUDA quantize / dequantize of keys (per-channel groups) and values (per-token groups).
// Layout and numerics: kivi_ops/ops/layout.py; codes, scales and zeros are bit-identical to
// kivi_ops/ops/reference.py. Memory-bound: each kernel reads and writes every byte once, with
// 16-byte accesses coalesced across the warp; a scalar kernel covers the shapes the vector
// kernels do not (odd head_dim or group size, unaligned pointers).
#include <torch/library.h>

#include "common.cuh"

namespace kivi::cuda {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFull = 0xffffffffu;

inline int64_t blocks_for(int64_t n, int threads = kThreads) { return (n + threads - 1) / threads; }

// ------------------------------------------------------------------------------------------------
// quantize_keys: k [B, H, T, D] -> codes [B, H, T/P, D], scale/zero [B, H, T/G, D]
// ------------------------------------------------------------------------------------------------

// One thread: 8 consecutive tokens x VEC = 16/sizeof(T) consecutive channels (eight 16-byte
// loads). The NCH = G/8 threads of one group (adjacent lanes) reduce min/max with shuffles.
// Lanes of a warp cover 32/NCH channel vectors x NCH token chunks: every load instruction reads
// whole 32-byte sectors. Thread index = ((slab * D/VEC) + channel vector) * NCH + chunk.
template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads) quantize_keys_vec_kernel(const T* __restrict__ x, uint8_t* __restrict__ codes,
                                                                     T* __restrict__ scale, T* __restrict__ zero,
                                                                     int64_t n_threads, int D, int G, int log2_nch) {
  constexpr int VEC = 16 / sizeof(T), CH = 8, P = 8 / BITS, ROWS = CH / P;
  constexpr float MAXQ = static_cast<float>((1 << BITS) - 1);
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool valid = idx < n_threads;
  // Out-of-range threads (a whole group of lanes) redo the last group; they store nothing.
  const int64_t i = valid ? idx : n_threads - 1;
  const int nch = 1 << log2_nch;
  const int ch = static_cast<int>(i & (nch - 1));
  const int64_t rest = i >> log2_nch;
  const int ncv = D / VEC;
  const int cv = static_cast<int>(rest % ncv);
  const int64_t slab = rest / ncv;
  const int64_t tok0 = slab * G + ch * CH;  // first token (over B*H*T) of this thread
  const T* src = x + tok0 * D + cv * VEC;

  uint4 raw[CH];
#pragma unroll
  for (int r = 0; r < CH; ++r) raw[r] = ldg_stream(src + static_cast<int64_t>(r) * D);

  float lo[VEC], hi[VEC];
#pragma unroll
  for (int c = 0; c < VEC; ++c) lo[c] = hi[c] = vec_elem<T>(raw[0], c);
#pragma unroll
  for (int r = 1; r < CH; ++r) {
#pragma unroll
    for (int c = 0; c < VEC; ++c) {
      const float v = vec_elem<T>(raw[r], c);
      lo[c] = fmin_nan(lo[c], v);
      hi[c] = fmax_nan(hi[c], v);
    }
  }
  for (int off = 1; off < nch; off <<= 1) {
#pragma unroll
    for (int c = 0; c < VEC; ++c) {
      lo[c] = fmin_nan(lo[c], __shfl_xor_sync(kFull, lo[c], off));
      hi[c] = fmax_nan(hi[c], __shfl_xor_sync(kFull, hi[c], off));
    }
  }
  T s[VEC], z[VEC];
  float sf[VEC], zf[VEC], inv[VEC];
#pragma unroll
  for (int c = 0; c < VEC; ++c) {
    group_params<T, BITS>(lo[c], hi[c], s[c], z[c]);
    sf[c] = to_f(s[c]);
    zf[c] = to_f(z[c]);
    inv[c] = safe_inv(sf[c]);
  }
  if (!valid) return;

  uint8_t* dst = codes + (tok0 / P) * D + cv * VEC;
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) {
    uint32_t w[VEC / 4];
#pragma unroll
    for (int k = 0; k < VEC / 4; ++k) w[k] = 0;
#pragma unroll
    for (int c = 0; c < VEC; ++c) {
      uint32_t byte = 0;
#pragma unroll
      for (int j = 0; j < P; ++j) {
        byte |= encode(vec_elem<T>(raw[rr * P + j], c), sf[c], inv[c], zf[c], MAXQ) << (j * BITS);
      }
      w[c / 4] |= byte << (8 * (c % 4));
    }
    if constexpr (VEC == 8) {
      *reinterpret_cast<uint2*>(dst + rr * D) = make_uint2(w[0], w[1]);
    } else {
      *reinterpret_cast<uint32_t*>(dst + rr * D) = w[0];
    }
  }
  const int64_t so = slab * D + cv * VEC;
  if (ch == 0) *reinterpret_cast<uint4*>(scale + so) = make_vec<T>(s);
  if (ch == (nch > 1 ? 1 : 0)) *reinterpret_cast<uint4*>(zero + so) = make_vec<T>(z);
}

// Generic: one thread per (group, channel), two passes over the group's G tokens.
template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads) quantize_keys_generic_kernel(const T* __restrict__ x, uint8_t* __restrict__ codes,
                                                                         T* __restrict__ scale, T* __restrict__ zero,
                                                                         int64_t n_threads, int D, int G) {
  constexpr int P = 8 / BITS;
  constexpr float MAXQ = static_cast<float>((1 << BITS) - 1);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_threads) return;
  const int d = static_cast<int>(i % D);
  const int64_t slab = i / D;
  const T* src = x + slab * G * D + d;
  float lo = to_f(src[0]), hi = lo;
  for (int t = 1; t < G; ++t) {
    const float v = to_f(src[static_cast<int64_t>(t) * D]);
    lo = fmin_nan(lo, v);
    hi = fmax_nan(hi, v);
  }
  T s, z;
  group_params<T, BITS>(lo, hi, s, z);
  const float sf = to_f(s), zf = to_f(z), inv = safe_inv(sf);
  uint8_t* dst = codes + slab * (G / P) * D + d;
  for (int r = 0; r < G / P; ++r) {
    uint32_t byte = 0;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      byte |= encode(to_f(src[static_cast<int64_t>(r * P + j) * D]), sf, inv, zf, MAXQ) << (j * BITS);
    }
    dst[static_cast<int64_t>(r) * D] = static_cast<uint8_t>(byte);
  }
  scale[slab * D + d] = s;
  zero[slab * D + d] = z;
}

// ------------------------------------------------------------------------------------------------
// quantize_keys, 16-bit inputs: the column kernel (docs/perf_plan.md §3 row 7)
//
// One thread: TPT consecutive tokens x one channel pair (one 32-bit word per token), so a warp
// load reads 32 consecutive words of a token row; the NCH = G / TPT threads of a group are
// adjacent lanes. Min/max run on packed pairs (one min.NaN.f16x2 per two elements), each thread
// derives its two groups' scale/zero itself (no broadcast), and every code costs 8 instructions
// with no branch (code_bits below): ~12 instructions per element in all (SASS), against ~20-25
// for the vector kernel above (64 branchy encodes with IEEE-division slow paths per thread, 90
// registers, 16 warps per SM).
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t ldg_stream32(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.b32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

// NaN-propagating min/max of two packed pairs of T (__half or __nv_bfloat16): exact selections,
// so the group's lo/hi equal the float32 min/max of the other kernels.
template <typename T>
__device__ __forceinline__ uint32_t min2_nan(uint32_t a, uint32_t b) {
  uint32_t d;
  if constexpr (std::is_same_v<T, __half>) {
    asm("min.NaN.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  } else {
    asm("min.NaN.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  }
  return d;
}
template <typename T>
__device__ __forceinline__ uint32_t max2_nan(uint32_t a, uint32_t b) {
  uint32_t d;
  if constexpr (std::is_same_v<T, __half>) {
    asm("max.NaN.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  } else {
    asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  }
  return d;
}

// The low / high element of a packed pair of T, as float (exact).
template <typename T>
__device__ __forceinline__ float pair_lo(uint32_t w) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xFFFFu)));
  } else {
    return __uint_as_float(w << 16);
  }
}
template <typename T>
__device__ __forceinline__ float pair_hi(uint32_t w) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  } else {
    return __uint_as_float(w & 0xFFFF0000u);
  }
}

// The bits of the float 2^23 + code, code = floor(RN(RN((x - z) / s) + 0.5)) exactly as
// encode_exact computes it, in 8 instructions (cvt, sub, mul, 2 fma, add, add.rm + the caller's
// shift-add), for a scale s with at most 11 significant bits (a float16/bfloat16 value) in
// [2^-100, 2^100] and inv = RN(1/s); s = inv = 0 gives code 0.
//   q0 = RN(d * inv) is within 2^-23 relative of y = d / s, so r = d - q0 * s is exact (it needs
//   at most 13 bits: s has <= 11); q0 + r * inv = y + r * (inv - 1/s) is off y by < 2^-46 y, while
//   y = d / s is > 2^-37 y away from every midpoint m between floats (d - m*s is a nonzero multiple
//   of a grid that fine), so the fma rounds it to RN(y) exactly. Then add 0.5 (RN, as the reference)
//   and floor by adding 2^23 rounding down (t is in [0, 2^23)). No clamp: s never undershoots
//   (hi - lo) / maxq, so the code never exceeds maxq. Checked on the host near every rounding
//   boundary for every float16 scale and every bfloat16 mantissa in that range
//   (benchmarks/quantize_keys_exactness.py --math); a group outside the range takes encode_exact.
__device__ __forceinline__ uint32_t code_bits(float x, float z, float s, float inv) {
  const float d = __fsub_rn(x, z);
  const float q0 = __fmul_rn(d, inv);
  const float q = __fmaf_rn(__fmaf_rn(-q0, s, d), inv, q0);
  return __float_as_uint(__fadd_rd(__fadd_rn(q, 0.5f), 8388608.f));
}

// Minus the exponent bits (0x4B000000) that the P x 2 fields of one packed code row bring when
// code_bits values are shifted into place and added (fields at bit 8 and up shift them out).
template <int BITS>
constexpr uint32_t pack_bias() {
  uint32_t b = 0;
  for (int j = 0; j < 8 / BITS; ++j) b += (0x4B000000u << (j * BITS)) + (0x4B000000u << (8 + j * BITS));
  return 0u - b;
}

// Everything after the loads, for one thread of a column kernel: raw[t] holds token t's channel
// pair. src (global, words_per_token apart) is re-read only by the exact fallback; cdst points at
// the thread's first code byte pair, sz_off at its scale/zero pair.
template <typename T, int BITS, int TPT>
__device__ __forceinline__ void keys_col_thread(const uint32_t (&raw)[TPT], const uint32_t* src, int64_t words_per_token,
                                                uint8_t* cdst, int D, T* scale, T* zero, int64_t sz_off, bool store_sz,
                                                int nch, bool valid) {
  constexpr int P = 8 / BITS, ROWS = TPT / P;
  constexpr float MAXQ = static_cast<float>((1 << BITS) - 1);
  uint32_t lo = raw[0], hi = raw[0];
#pragma unroll
  for (int t = 1; t < TPT; ++t) {
    lo = min2_nan<T>(lo, raw[t]);
    hi = max2_nan<T>(hi, raw[t]);
  }
  for (int off = 1; off < nch; off <<= 1) {
    lo = min2_nan<T>(lo, __shfl_xor_sync(kFull, lo, off));
    hi = max2_nan<T>(hi, __shfl_xor_sync(kFull, hi, off));
  }
  if (!valid) return;

  T s[2], z[2];
  float sf[2], zf[2], inv[2];
  const float lof[2] = {pair_lo<T>(lo), pair_hi<T>(lo)}, hif[2] = {pair_lo<T>(hi), pair_hi<T>(hi)};
  bool fast = true;
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    group_params<T, BITS>(lof[c], hif[c], s[c], z[c]);
    sf[c] = to_f(s[c]);
    zf[c] = to_f(z[c]);
    // code_bits' range; NaN scales (non-finite groups) fail it too
    fast = fast && (sf[c] == 0.f || (sf[c] >= 0x1p-100f && sf[c] <= 0x1p100f));
    inv[c] = sf[c] > 0.f ? __frcp_rn(sf[c]) : 0.f;
  }
  if (store_sz) {
    *reinterpret_cast<uint32_t*>(scale + sz_off) = elem_bits(s[0]) | (elem_bits(s[1]) << 16);
    *reinterpret_cast<uint32_t*>(zero + sz_off) = elem_bits(z[0]) | (elem_bits(z[1]) << 16);
  }
  if (fast) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      uint32_t w = pack_bias<BITS>();
#pragma unroll
      for (int j = 0; j < P; ++j) {
        w += code_bits(pair_lo<T>(raw[r * P + j]), zf[0], sf[0], inv[0]) << (j * BITS);
        w += code_bits(pair_hi<T>(raw[r * P + j]), zf[1], sf[1], inv[1]) << (8 + j * BITS);
      }
      *reinterpret_cast<uint16_t*>(cdst + static_cast<int64_t>(r) * D) = static_cast<uint16_t>(w);
    }
  } else {
    // Rare (a non-finite group, or a bfloat16 scale beyond 2^+-100): IEEE division per code.
#pragma unroll 1
    for (int r = 0; r < ROWS; ++r) {
      uint32_t w = 0;
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const uint32_t v = ldg_stream32(src + (r * P + j) * words_per_token);
        w |= encode_exact(pair_lo<T>(v), sf[0], zf[0], MAXQ) << (j * BITS);
        w |= encode_exact(pair_hi<T>(v), sf[1], zf[1], MAXQ) << (8 + j * BITS);
      }
      *reinterpret_cast<uint16_t*>(cdst + static_cast<int64_t>(r) * D) = static_cast<uint16_t>(w);
    }
  }
}

// All TPT loads of a thread issued at once, straight into registers. Thread
// index = ((slab * D/2) + channel pair) * NCH + chunk; n_threads < 2^31. NCP = D/2 when the head
// dim is 64 or 128 (the loads then take immediate offsets and the index split is a shift), or 0:
// read at run time from ncp_rt. MINB caps the registers (ptxas otherwise converts all 64 inputs
// up front: 139 registers).
template <typename T, int BITS, int TPT, int NCP, int MINB>
__global__ void __launch_bounds__(kThreads, MINB) quantize_keys_col_kernel(const T* __restrict__ x, uint8_t* __restrict__ codes,
                                                                           T* __restrict__ scale, T* __restrict__ zero,
                                                                           uint32_t n_threads, int ncp_rt, int log2_nch) {
  constexpr int P = 8 / BITS;
  const uint32_t ncp = NCP ? NCP : static_cast<uint32_t>(ncp_rt);
  const int D = 2 * static_cast<int>(ncp);
  const uint32_t idx = blockIdx.x * blockDim.x + threadIdx.x;
  const bool valid = idx < n_threads;
  const uint32_t i = valid ? idx : n_threads - 1;  // a whole group of lanes; redoes the last group, stores nothing
  const int nch = 1 << log2_nch;
  const int chunk = static_cast<int>(i & (nch - 1));
  const uint32_t rest = i >> log2_nch;
  const uint32_t cp = rest % ncp, slab = rest / ncp;
  const int64_t tok0 = static_cast<int64_t>(slab) * (TPT << log2_nch) + chunk * TPT;
  const uint32_t* src = reinterpret_cast<const uint32_t*>(x) + tok0 * ncp + cp;
  uint32_t raw[TPT];
#pragma unroll
  for (int t = 0; t < TPT; ++t) raw[t] = ldg_stream32(src + t * ncp);
  keys_col_thread<T, BITS, TPT>(raw, src, ncp, codes + (tok0 / P) * D + 2 * cp, D, scale, zero,
                                static_cast<int64_t>(slab) * D + 2 * cp, chunk == 0, nch, valid);
}

constexpr int kColTpt = 32;  // tokens per thread in the column kernel (16 when G = 16)

// 16-bit keys run the column kernel (measured on the H200, 2026-11-29, 32k x 32 x 128 fp16: 88 % of
// copy bandwidth at 2 bits, against 34 % for the vector kernel; benchmarks/quantize_keys_exactness.py
// kept the comparison). Float32 keys, and shapes it does not take (odd head_dim, G = 8, G not 16 or
// 32 times a power of two up to 32, unaligned input), run the vector or generic kernel.
template <typename T, int BITS, int TPT, int MINB>
void launch_keys_col_direct(const T* x, uint8_t* codes, T* scale, T* zero, int64_t n, int64_t D, int log2_nch,
                            cudaStream_t stream) {
  const auto go = [&](auto kernel) {
    kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, codes, scale, zero, static_cast<uint32_t>(n),
                                                   static_cast<int>(D / 2), log2_nch);
  };
  if (D == 128) {
    go(quantize_keys_col_kernel<T, BITS, TPT, 64, MINB>);
  } else if (D == 64) {
    go(quantize_keys_col_kernel<T, BITS, TPT, 32, MINB>);
  } else {
    go(quantize_keys_col_kernel<T, BITS, TPT, 0, MINB>);
  }
}

template <typename T, int BITS>
bool launch_keys_col(const T* x, uint8_t* codes, T* scale, T* zero, int64_t numel, int64_t D, int64_t G,
                     cudaStream_t stream) {
  if constexpr (sizeof(T) != 2) {
    return false;  // code_bits needs a scale of at most 11 significant bits
  } else {
    if (D % 2 != 0 || !aligned16(x)) return false;
    const int tpt = G % kColTpt != 0 ? 16 : kColTpt;  // G = 16: 16 tokens per thread
    const int log2_nch = G % tpt == 0 ? ilog2_exact(G / tpt) : -1;
    const int64_t n = numel / (2 * tpt);  // threads
    if (log2_nch < 0 || log2_nch > 5 || n >= (int64_t(1) << 31)) return false;
    if (tpt == 16) {
      launch_keys_col_direct<T, BITS, 16, 5>(x, codes, scale, zero, n, D, log2_nch, stream);
    } else {
      launch_keys_col_direct<T, BITS, kColTpt, 4>(x, codes, scale, zero, n, D, log2_nch, stream);
    }
    return true;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_keys(const at::Tensor& k_in, int64_t bits, int64_t G) {
  check_bits_group(bits, G);
  check_float_4d(k_in, "k");
  const int64_t B = k_in.size(0), H = k_in.size(1), T = k_in.size(2), D = k_in.size(3), P = 8 / bits;
  KIVI_CHECK(T % G == 0, "kivi: k's token count (", T, ") must be a multiple of group_size (", G, ")");
  const c10::cuda::CUDAGuard guard(k_in.device());
  const auto k = k_in.contiguous();
  auto codes = at::empty({B, H, T / P, D}, k.options().dtype(at::kByte));
  auto scale = at::empty({B, H, T / G, D}, k.options());
  auto zero = at::empty(scale.sizes(), scale.options());
  if (k.numel() == 0) return {codes, scale, zero};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t slabs = B * H * (T / G);
  const int log2_nch = ilog2_exact(G / 8);
  dispatch_float(k.scalar_type(), "quantize_keys", [&](auto tag) {
    using TT = typename decltype(tag)::type;
    constexpr int VEC = 16 / sizeof(TT);
    dispatch_bits(bits, [&](auto bt) {
      constexpr int BITS = decltype(bt)::value;
      const TT* x = reinterpret_cast<const TT*>(k.const_data_ptr());
      TT* sp = reinterpret_cast<TT*>(scale.mutable_data_ptr());
      TT* zp = reinterpret_cast<TT*>(zero.mutable_data_ptr());
      uint8_t* cp = codes.mutable_data_ptr<uint8_t>();
      const bool vec = !force_generic() && D % VEC == 0 && log2_nch >= 0 && log2_nch <= 5 && aligned16(x);
      if (!force_generic() && launch_keys_col<TT, BITS>(x, cp, sp, zp, k.numel(), D, G, stream)) {
        // launched (16-bit keys)
      } else if (vec) {
        const int64_t n = slabs * (D / VEC) * (G / 8);
        quantize_keys_vec_kernel<TT, BITS><<<blocks_for(n), kThreads, 0, stream>>>(
            x, cp, sp, zp, n, static_cast<int>(D), static_cast<int>(G), log2_nch);
      } else {
        const int64_t n = slabs * D;
        quantize_keys_generic_kernel<TT, BITS><<<blocks_for(n), kThreads, 0, stream>>>(
            x, cp, sp, zp, n, static_cast<int>(D), static_cast<int>(G));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {codes, scale, zero};
}

// ------------------------------------------------------------------------------------------------
// quantize_values: v [B, H, T, D] -> codes [B, H, T, D/P], scale/zero [B, H, T, D/G]
// Flat view: the tensor is a sequence of groups of G consecutive elements.
// ------------------------------------------------------------------------------------------------

// One thread: E consecutive elements (E = 16: two or four 16-byte loads; E = 32: four or eight),
// E*BITS/8 code bytes (4- to 16-byte stores). The TPG = G/E threads of a group reduce with
// shuffles. E = 32 (a whole group of 32 per thread, no shuffles, more bytes in flight per thread) is
// the default: on the H200 it reaches 64.7 % / 71.1 % of copy at 2 / 4 bits against 59.9 / 65.5 %
// for E = 16 (benchmarks/results/2026-11-29-h200-c9c20a8). KIVI_VALUES_EPT=16 selects E = 16.
template <typename T, int BITS, int E>
__global__ void __launch_bounds__(kThreads) quantize_values_vec_kernel(const T* __restrict__ x, uint8_t* __restrict__ codes,
                                                                       T* __restrict__ scale, T* __restrict__ zero,
                                                                       int64_t n_threads, int log2_tpg) {
  constexpr int VEC = 16 / sizeof(T), NV = E / VEC, P = 8 / BITS, NB = E / P;
  constexpr float MAXQ = static_cast<float>((1 << BITS) - 1);
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool valid = idx < n_threads;
  const int64_t i = valid ? idx : n_threads - 1;
  const T* src = x + i * E;
  uint4 raw[NV];
#pragma unroll
  for (int k = 0; k < NV; ++k) raw[k] = ldg_stream(src + k * VEC);
  float lo = vec_elem<T>(raw[0], 0), hi = lo;
#pragma unroll
  for (int e = 1; e < E; ++e) {
    const float v = vec_elem<T>(raw[e / VEC], e % VEC);
    lo = fmin_nan(lo, v);
    hi = fmax_nan(hi, v);
  }
  const int tpg = 1 << log2_tpg;
  for (int off = 1; off < tpg; off <<= 1) {
    lo = fmin_nan(lo, __shfl_xor_sync(kFull, lo, off));
    hi = fmax_nan(hi, __shfl_xor_sync(kFull, hi, off));
  }
  T s, z;
  group_params<T, BITS>(lo, hi, s, z);
  if (!valid) return;
  const float sf = to_f(s), zf = to_f(z), inv = safe_inv(sf);
  uint32_t w[NB / 4];
#pragma unroll
  for (int k = 0; k < NB / 4; ++k) w[k] = 0;
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    uint32_t byte = 0;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int e = b * P + j;
      byte |= encode(vec_elem<T>(raw[e / VEC], e % VEC), sf, inv, zf, MAXQ) << (j * BITS);
    }
    w[b / 4] |= byte << (8 * (b % 4));
  }
  uint8_t* dst = codes + i * NB;
  if constexpr (NB == 4) {
    *reinterpret_cast<uint32_t*>(dst) = w[0];
  } else if constexpr (NB == 8) {
    *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
  } else {
#pragma unroll
    for (int k = 0; k < NB / 16; ++k)
      reinterpret_cast<uint4*>(dst)[k] = make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]);
  }
  if ((i & (tpg - 1)) == 0) {
    scale[i >> log2_tpg] = s;
    zero[i >> log2_tpg] = z;
  }
}

// Generic: one thread per group.
template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads) quantize_values_generic_kernel(const T* __restrict__ x, uint8_t* __restrict__ codes,
                                                                           T* __restrict__ scale, T* __restrict__ zero,
                                                                           int64_t n_groups, int G) {
  constexpr int P = 8 / BITS;
  constexpr float MAXQ = static_cast<float>((1 << BITS) - 1);
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= n_groups) return;
  const T* src = x + g * G;
  float lo = to_f(src[0]), hi = lo;
  for (int e = 1; e < G; ++e) {
    const float v = to_f(src[e]);
    lo = fmin_nan(lo, v);
    hi = fmax_nan(hi, v);
  }
  T s, z;
  group_params<T, BITS>(lo, hi, s, z);
  const float sf = to_f(s), zf = to_f(z), inv = safe_inv(sf);
  uint8_t* dst = codes + g * (G / P);
  for (int b = 0; b < G / P; ++b) {
    uint32_t byte = 0;
#pragma unroll
    for (int j = 0; j < P; ++j) byte |= encode(to_f(src[b * P + j]), sf, inv, zf, MAXQ) << (j * BITS);
    dst[b] = static_cast<uint8_t>(byte);
  }
  scale[g] = s;
  zero[g] = z;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_values(const at::Tensor& v_in, int64_t bits, int64_t G) {
  check_bits_group(bits, G);
  check_float_4d(v_in, "v");
  const int64_t B = v_in.size(0), H = v_in.size(1), T = v_in.size(2), D = v_in.size(3), P = 8 / bits;
  KIVI_CHECK(D % G == 0, "kivi: v's head_dim (", D, ") must be a multiple of group_size (", G, ")");
  const c10::cuda::CUDAGuard guard(v_in.device());
  const auto v = v_in.contiguous();
  auto codes = at::empty({B, H, T, D / P}, v.options().dtype(at::kByte));
  auto scale = at::empty({B, H, T, D / G}, v.options());
  auto zero = at::empty(scale.sizes(), scale.options());
  if (v.numel() == 0) return {codes, scale, zero};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n_groups = v.numel() / G;
  const int ept = env_int("KIVI_VALUES_EPT") != 16 && G % 32 == 0 ? 32 : 16;  // tuning knob (see the kernel)
  const int log2_tpg = G % ept == 0 ? ilog2_exact(G / ept) : -1;
  dispatch_float(v.scalar_type(), "quantize_values", [&](auto tag) {
    using TT = typename decltype(tag)::type;
    dispatch_bits(bits, [&](auto bt) {
      constexpr int BITS = decltype(bt)::value;
      const TT* x = reinterpret_cast<const TT*>(v.const_data_ptr());
      TT* sp = reinterpret_cast<TT*>(scale.mutable_data_ptr());
      TT* zp = reinterpret_cast<TT*>(zero.mutable_data_ptr());
      uint8_t* cp = codes.mutable_data_ptr<uint8_t>();
      if (!force_generic() && log2_tpg >= 0 && log2_tpg <= 5 && aligned16(x)) {
        const int64_t n = v.numel() / ept;
        if (ept == 32) {
          quantize_values_vec_kernel<TT, BITS, 32><<<blocks_for(n), kThreads, 0, stream>>>(x, cp, sp, zp, n, log2_tpg);
        } else {
          quantize_values_vec_kernel<TT, BITS, 16><<<blocks_for(n), kThreads, 0, stream>>>(x, cp, sp, zp, n, log2_tpg);
        }
      } else {
        quantize_values_generic_kernel<TT, BITS><<<blocks_for(n_groups), kThreads, 0, stream>>>(
            x, cp, sp, zp, n_groups, static_cast<int>(G));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {codes, scale, zero};
}

// ------------------------------------------------------------------------------------------------
// dequantize_keys: codes [B, H, T/P, D] + scale/zero [B, H, T/G, D] -> [B, H, T, D] (scale dtype)
// ------------------------------------------------------------------------------------------------

// One thread: one code row (P tokens) x VEC channels: one 8- or 4-byte code load, the group's
// scale and zero vectors (16 bytes each, shared by the G/P threads of the group through L1),
// P 16-byte stores.
template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads) dequantize_keys_vec_kernel(const uint8_t* __restrict__ codes,
                                                                       const T* __restrict__ scale,
                                                                       const T* __restrict__ zero, T* __restrict__ out,
                                                                       int64_t n_threads, int D, int rows_per_head,
                                                                       int rows_per_group) {
  constexpr int VEC = 16 / sizeof(T), P = 8 / BITS;
  constexpr uint32_t M = (1u << BITS) - 1u;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_threads) return;
  const int ncv = D / VEC;
  const int cv = static_cast<int>(i % ncv);
  const int64_t row = i / ncv;  // code row over B*H*(T/P)
  const int64_t bh = row / rows_per_head;
  const int rr = static_cast<int>(row % rows_per_head);
  const int64_t grp = bh * (rows_per_head / rows_per_group) + rr / rows_per_group;
  uint32_t cw[VEC / 4];
  if constexpr (VEC == 8) {
    const uint2 c2 = *reinterpret_cast<const uint2*>(codes + row * D + cv * VEC);
    cw[0] = c2.x;
    cw[1] = c2.y;
  } else {
    cw[0] = *reinterpret_cast<const uint32_t*>(codes + row * D + cv * VEC);
  }
  const uint4 sv = *reinterpret_cast<const uint4*>(scale + grp * D + cv * VEC);
  const uint4 zv = *reinterpret_cast<const uint4*>(zero + grp * D + cv * VEC);
  float sf[VEC], zf[VEC];
#pragma unroll
  for (int c = 0; c < VEC; ++c) {
    sf[c] = vec_elem<T>(sv, c);
    zf[c] = vec_elem<T>(zv, c);
  }
  T* dst = out + (row * P) * D + cv * VEC;
#pragma unroll
  for (int j = 0; j < P; ++j) {
    T e[VEC];
#pragma unroll
    for (int c = 0; c < VEC; ++c) {
      const uint32_t code = (cw[c / 4] >> (8 * (c % 4) + j * BITS)) & M;
      e[c] = from_f<T>(dequant(code, sf[c], zf[c]));
    }
    *reinterpret_cast<uint4*>(dst + static_cast<int64_t>(j) * D) = make_vec<T>(e);
  }
}

template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads) dequantize_keys_generic_kernel(const uint8_t* __restrict__ codes,
                                                                           const T* __restrict__ scale,
                                                                           const T* __restrict__ zero, T* __restrict__ out,
                                                                           int64_t n, int D, int64_t T_tok, int G) {
  constexpr int P = 8 / BITS;
  constexpr uint32_t M = (1u << BITS) - 1u;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // output element
  if (i >= n) return;
  const int d = static_cast<int>(i % D);
  const int64_t bt = i / D;  // (b*H + h)*T + t
  const int64_t bh = bt / T_tok, t = bt % T_tok;
  const uint32_t code = (codes[(bh * (T_tok / P) + t / P) * D + d] >> ((t % P) * BITS)) & M;
  const int64_t grp = (bh * (T_tok / G) + t / G) * D + d;
  out[i] = from_f<T>(dequant(code, to_f(scale[grp]), to_f(zero[grp])));
}

void check_packed(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero) {
  check_codes(codes, "codes");
  check_float_4d(scale, "scale");
  check_float_4d(zero, "zero");
  check_same_device(codes, "codes", scale, "scale");
  check_same_device(codes, "codes", zero, "zero");
  KIVI_CHECK(scale.sizes() == zero.sizes() && scale.scalar_type() == zero.scalar_type(),
              "kivi: scale ", scale.sizes(), " ", scale.scalar_type(), " and zero ", zero.sizes(), " ",
              zero.scalar_type(), " must have the same shape and dtype");
}

at::Tensor dequantize_keys(const at::Tensor& codes_in, const at::Tensor& scale_in, const at::Tensor& zero_in,
                           int64_t bits, int64_t G) {
  check_bits_group(bits, G);
  check_packed(codes_in, scale_in, zero_in);
  const int64_t B = codes_in.size(0), H = codes_in.size(1), P = 8 / bits, T = codes_in.size(2) * P;
  const int64_t D = codes_in.size(3);
  KIVI_CHECK(T % G == 0 && scale_in.size(0) == B && scale_in.size(1) == H && scale_in.size(2) == T / G &&
                  scale_in.size(3) == D,
              "kivi: codes ", codes_in.sizes(), " hold ", T, " tokens at ", bits, " bits, so scale/zero must be [", B,
              ", ", H, ", ", T / G, ", ", D, "] for group_size ", G, ", got ", scale_in.sizes());
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const auto codes = codes_in.contiguous();
  const auto scale = scale_in.contiguous();
  const auto zero = zero_in.contiguous();
  auto out = at::empty({B, H, T, D}, scale.options());
  if (out.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(scale.scalar_type(), "dequantize_keys", [&](auto tag) {
    using TT = typename decltype(tag)::type;
    constexpr int VEC = 16 / sizeof(TT);
    dispatch_bits(bits, [&](auto bt) {
      constexpr int BITS = decltype(bt)::value;
      const uint8_t* cp = codes.const_data_ptr<uint8_t>();
      const TT* sp = reinterpret_cast<const TT*>(scale.const_data_ptr());
      const TT* zp = reinterpret_cast<const TT*>(zero.const_data_ptr());
      TT* op = reinterpret_cast<TT*>(out.mutable_data_ptr());
      if (!force_generic() && D % VEC == 0 && aligned16(cp) && aligned16(sp) && aligned16(zp) && aligned16(op)) {
        const int64_t n = B * H * (T / P) * (D / VEC);
        check_fits_int32(T / P, "code rows per head");
        dequantize_keys_vec_kernel<TT, BITS><<<blocks_for(n), kThreads, 0, stream>>>(
            cp, sp, zp, op, n, static_cast<int>(D), static_cast<int>(T / P), static_cast<int>(G / P));
      } else {
        const int64_t n = out.numel();
        dequantize_keys_generic_kernel<TT, BITS><<<blocks_for(n), kThreads, 0, stream>>>(
            cp, sp, zp, op, n, static_cast<int>(D), T, static_cast<int>(G));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------------------
// dequantize_values: codes [B, H, T, D/P] + scale/zero [B, H, T, D/G] -> [B, H, T, D]
// ------------------------------------------------------------------------------------------------

// One thread: 16 consecutive output elements of one group (G % 16 == 0).
template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads) dequantize_values_vec_kernel(const uint8_t* __restrict__ codes,
                                                                         const T* __restrict__ scale,
                                                                         const T* __restrict__ zero,
                                                                         T* __restrict__ out, int64_t n_threads, int G) {
  constexpr int E = 16, VEC = 16 / sizeof(T), NV = E / VEC, P = 8 / BITS, NB = E / P;
  constexpr uint32_t M = (1u << BITS) - 1u;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_threads) return;
  uint32_t w[NB / 4];
  const uint8_t* src = codes + i * NB;
  if constexpr (NB == 4) {
    w[0] = *reinterpret_cast<const uint32_t*>(src);
  } else if constexpr (NB == 8) {
    const uint2 c = *reinterpret_cast<const uint2*>(src);
    w[0] = c.x;
    w[1] = c.y;
  } else {
    const uint4 c = *reinterpret_cast<const uint4*>(src);
    w[0] = c.x;
    w[1] = c.y;
    w[2] = c.z;
    w[3] = c.w;
  }
  const int64_t grp = (i * E) / G;
  const float sf = to_f(scale[grp]), zf = to_f(zero[grp]);
  T* dst = out + i * E;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    T e[VEC];
#pragma unroll
    for (int c = 0; c < VEC; ++c) {
      const int el = k * VEC + c, b = el / P, j = el % P;
      const uint32_t code = (w[b / 4] >> (8 * (b % 4) + j * BITS)) & M;
      e[c] = from_f<T>(dequant(code, sf, zf));
    }
    *reinterpret_cast<uint4*>(dst + k * VEC) = make_vec<T>(e);
  }
}

template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads) dequantize_values_generic_kernel(const uint8_t* __restrict__ codes,
                                                                             const T* __restrict__ scale,
                                                                             const T* __restrict__ zero,
                                                                             T* __restrict__ out, int64_t n, int G) {
  constexpr int P = 8 / BITS;
  constexpr uint32_t M = (1u << BITS) - 1u;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint32_t code = (codes[i / P] >> ((i % P) * BITS)) & M;
  const int64_t grp = i / G;
  out[i] = from_f<T>(dequant(code, to_f(scale[grp]), to_f(zero[grp])));
}

at::Tensor dequantize_values(const at::Tensor& codes_in, const at::Tensor& scale_in, const at::Tensor& zero_in,
                             int64_t bits, int64_t G) {
  check_bits_group(bits, G);
  check_packed(codes_in, scale_in, zero_in);
  const int64_t B = codes_in.size(0), H = codes_in.size(1), T = codes_in.size(2), P = 8 / bits;
  const int64_t D = codes_in.size(3) * P;
  KIVI_CHECK(D % G == 0 && scale_in.size(0) == B && scale_in.size(1) == H && scale_in.size(2) == T &&
                  scale_in.size(3) == D / G,
              "kivi: codes ", codes_in.sizes(), " hold head_dim ", D, " at ", bits, " bits, so scale/zero must be [", B,
              ", ", H, ", ", T, ", ", D / G, "] for group_size ", G, ", got ", scale_in.sizes());
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const auto codes = codes_in.contiguous();
  const auto scale = scale_in.contiguous();
  const auto zero = zero_in.contiguous();
  auto out = at::empty({B, H, T, D}, scale.options());
  if (out.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(scale.scalar_type(), "dequantize_values", [&](auto tag) {
    using TT = typename decltype(tag)::type;
    dispatch_bits(bits, [&](auto bt) {
      constexpr int BITS = decltype(bt)::value;
      const uint8_t* cp = codes.const_data_ptr<uint8_t>();
      const TT* sp = reinterpret_cast<const TT*>(scale.const_data_ptr());
      const TT* zp = reinterpret_cast<const TT*>(zero.const_data_ptr());
      TT* op = reinterpret_cast<TT*>(out.mutable_data_ptr());
      if (!force_generic() && G % 16 == 0 && aligned16(cp) && aligned16(op)) {
        const int64_t n = out.numel() / 16;
        dequantize_values_vec_kernel<TT, BITS><<<blocks_for(n), kThreads, 0, stream>>>(cp, sp, zp, op, n,
                                                                                      static_cast<int>(G));
      } else {
        const int64_t n = out.numel();
        dequantize_values_generic_kernel<TT, BITS><<<blocks_for(n), kThreads, 0, stream>>>(cp, sp, zp, op, n,
                                                                                          static_cast<int>(G));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace
}  // namespace kivi::cuda

TORCH_LIBRARY_IMPL(kivi, CUDA, m) {
  m.impl("quantize_keys", &kivi::cuda::quantize_keys);
  m.impl("quantize_values", &kivi::cuda::quantize_values);
  m.impl("dequantize_keys", &kivi::cuda::dequantize_keys);
  m.impl("dequantize_values", &kivi::cuda::dequantize_values);
}
