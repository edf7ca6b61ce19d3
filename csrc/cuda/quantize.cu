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

inline int ilog2_exact(int64_t v) {  // log2(v) if v is a power of two, else -1
  if (v <= 0 || (v & (v - 1)) != 0) return -1;
  int l = 0;
  while ((int64_t(1) << l) < v) ++l;
  return l;
}

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
      if (vec) {
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

// One thread: 16 consecutive elements (two or four 16-byte loads), 16*BITS/8 code bytes (one
// 4-, 8- or 16-byte store). The TPG = G/16 threads of a group reduce with shuffles.
template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads) quantize_values_vec_kernel(const T* __restrict__ x, uint8_t* __restrict__ codes,
                                                                       T* __restrict__ scale, T* __restrict__ zero,
                                                                       int64_t n_threads, int log2_tpg) {
  constexpr int E = 16, VEC = 16 / sizeof(T), NV = E / VEC, P = 8 / BITS, NB = E / P;
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
    *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
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
  const int log2_tpg = G % 16 == 0 ? ilog2_exact(G / 16) : -1;
  dispatch_float(v.scalar_type(), "quantize_values", [&](auto tag) {
    using TT = typename decltype(tag)::type;
    dispatch_bits(bits, [&](auto bt) {
      constexpr int BITS = decltype(bt)::value;
      const TT* x = reinterpret_cast<const TT*>(v.const_data_ptr());
      TT* sp = reinterpret_cast<TT*>(scale.mutable_data_ptr());
      TT* zp = reinterpret_cast<TT*>(zero.mutable_data_ptr());
      uint8_t* cp = codes.mutable_data_ptr<uint8_t>();
      if (!force_generic() && log2_tpg >= 0 && log2_tpg <= 5 && aligned16(x)) {
        const int64_t n = v.numel() / 16;
        quantize_values_vec_kernel<TT, BITS><<<blocks_for(n), kThreads, 0, stream>>>(x, cp, sp, zp, n, log2_tpg);
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
