// kivi::_static_append_one_: one new token appended to the KIVI state of the static stores in ONE
// kernel (csrc/static_cache.cpp: static_kv_append_ takes it for a CUDA decode step, M == 1).
// The composite it replaces is ~25 small ATen ops per layer (window gather, quantize, six
// index_copy_, ring writes), each a node of the decode step's CUDA graph.
//
// Same bytes as the composite (tests/cache/test_static.py compares the stores):
//   keys: the token's key group g0 = n / G is re-quantized from the window of G positions
//         g0*G + j: j < n - g0*G from the ring (slot position % R), the new token at n, zeros after
//         (the composite's where/zeros window); codes, scale and zero of group g0 are rewritten,
//         then the new key goes to ring slot n % R;
//   values: the new token's D/G per-token groups are quantized into row n; the value to slot n % R.
// The numerics are common.cuh's (group_params, encode), which every quantize kernel uses: bit-equal
// to kivi::quantize_keys / quantize_values and to the reference.
#include <torch/library.h>

#include "common.cuh"

namespace kivi::cuda {
namespace {

constexpr int kAppendThreads = 128;

struct AppendArgs {
  const void* k;  // the new key / value rows: element (b, h, d) at b * sB + h * sH + d * sD
  const void* v;
  int64_t k_sB, k_sH, k_sD, v_sB, v_sH, v_sD;
  const int64_t* pos;  // [1]: n, the new token's position (on the device)
  void* k_ring;        // [B, H, R, D]
  void* k_scale;       // [B, H, NGk, D]
  void* k_zero;
  uint8_t* k_codes;    // [B, H, NGk * G / PK, D]
  void* v_ring;        // [B, H, R, D]
  void* v_scale;       // [B, H, L, D / G]
  void* v_zero;
  uint8_t* v_codes;    // [B, H, L, D * VB / 8]
  int H, D, G, R;
  int64_t NGk, L;
};

// One block per (b, h); thread d owns channel d of the key group, then the value groups are reduced
// through shared memory (D floats, then a (scale, zero) pair per group).
template <typename T, int KB, int VB>
__global__ void __launch_bounds__(kAppendThreads) static_append_one_kernel(const __grid_constant__ AppendArgs a) {
  extern __shared__ float sm[];  // [D] the new value row, then [2 * D/G] (scale, zero) as float
  constexpr int PK = 8 / KB, PV = 8 / VB;
  constexpr float KMAX = static_cast<float>((1 << KB) - 1);
  const int D = a.D, G = a.G, R = a.R, NGv = D / G;
  const int64_t bh = blockIdx.x;
  const int b = static_cast<int>(bh / a.H), h = static_cast<int>(bh % a.H);
  const int64_t n = *a.pos;
  const int64_t g0 = n / G;
  const int newest = static_cast<int>(n - g0 * G);  // the new token's index in its key group
  const int slot = static_cast<int>(n % R);
  const T* krow = static_cast<const T*>(a.k) + b * a.k_sB + h * a.k_sH;
  const T* vrow = static_cast<const T*>(a.v) + b * a.v_sB + h * a.v_sH;
  T* kring = static_cast<T*>(a.k_ring) + bh * R * D;
  T* vring = static_cast<T*>(a.v_ring) + bh * R * D;

  // keys: re-quantize group g0, one channel per thread (the ring holds positions (n - R, n) in
  // their slots; the window's positions are all in (n - G, n], so no slot is the new token's)
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    const T knew = krow[d * a.k_sD];
    auto window = [&](int j) -> float {
      if (j < newest) return to_f(kring[((g0 * G + j) % R) * D + d]);
      return j == newest ? to_f(knew) : 0.f;
    };
    float lo = window(0), hi = lo;
#pragma unroll 8
    for (int j = 1; j < G; ++j) {  // unrolled: the window's loads (L2 hits, mostly) in flight together
      const float x = window(j);
      lo = fmin_nan(lo, x);
      hi = fmax_nan(hi, x);
    }
    T s, z;
    group_params<T, KB>(lo, hi, s, z);
    const float sf = to_f(s), zf = to_f(z), inv = safe_inv(sf);
    uint8_t* codes = a.k_codes + (bh * a.NGk * (G / PK) + g0 * (G / PK)) * D + d;
#pragma unroll 4
    for (int r = 0; r < G / PK; ++r) {
      uint32_t byte = 0;
#pragma unroll
      for (int j = 0; j < PK; ++j) byte |= encode(window(r * PK + j), sf, inv, zf, KMAX) << (j * KB);
      codes[static_cast<int64_t>(r) * D] = static_cast<uint8_t>(byte);
    }
    static_cast<T*>(a.k_scale)[(bh * a.NGk + g0) * D + d] = s;
    static_cast<T*>(a.k_zero)[(bh * a.NGk + g0) * D + d] = z;
    kring[slot * D + d] = knew;
  }

  // values: per-token groups of G channels
  float* vf = sm;
  float* sz = sm + D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    const T x = vrow[d * a.v_sD];
    vf[d] = to_f(x);
    vring[slot * D + d] = x;
  }
  __syncthreads();
  quantize_value_row<T, VB>(vf, sz, D, G, static_cast<T*>(a.v_scale) + (bh * a.L + n) * NGv,
                            static_cast<T*>(a.v_zero) + (bh * a.L + n) * NGv, a.v_codes + (bh * a.L + n) * (D / PV));
}

void check_part(const at::Tensor& t, const at::Tensor& k, const char* name, at::ScalarType dtype) {
  KIVI_CHECK(t.is_cuda() && t.device() == k.device(), "kivi: _static_append_one_: ", name, " must be on ", k.device());
  KIVI_CHECK(t.is_contiguous() && t.dim() == 4 && t.scalar_type() == dtype, "kivi: _static_append_one_: ", name,
             " must be a contiguous 4-D ", dtype, " tensor, got ", t.scalar_type(), " ", t.sizes());
}

// The carved regions of the stores (static_cache.cpp: key_state / value_state) and the new token.
void static_append_one_(const at::Tensor& k_ring, const at::Tensor& k_scale, const at::Tensor& k_zero,
                        const at::Tensor& k_codes, const at::Tensor& v_ring, const at::Tensor& v_scale,
                        const at::Tensor& v_zero, const at::Tensor& v_codes, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& pos, int64_t k_bits, int64_t v_bits, int64_t G, int64_t R) {
  const auto dt = k_ring.scalar_type();
  KIVI_CHECK(k.dim() == 4 && v.sizes() == k.sizes() && k.size(2) == 1 && k.scalar_type() == dt && v.scalar_type() == dt,
             "kivi: _static_append_one_ takes one new token: k, v [B, H, 1, D] of the store dtype ", dt, ", got ",
             k.scalar_type(), " ", k.sizes(), " and ", v.scalar_type(), " ", v.sizes());
  const int64_t B = k.size(0), H = k.size(1), D = k.size(3);
  for (auto [t, name] : {std::pair{&k_ring, "k_ring"}, {&k_scale, "k_scale"}, {&k_zero, "k_zero"},
                         {&v_ring, "v_ring"}, {&v_scale, "v_scale"}, {&v_zero, "v_zero"}}) {
    check_part(*t, k, name, dt);
  }
  check_part(k_codes, k, "k_codes", at::kByte);
  check_part(v_codes, k, "v_codes", at::kByte);
  check_bits_group(k_bits, G, "k_bits");
  check_bits_group(v_bits, G, "v_bits");
  KIVI_CHECK(D % G == 0 && R % G == 0 && D <= 4096, "kivi: _static_append_one_: group_size ", G,
             " must divide head_dim ", D, " (at most 4096) and residual_length ", R);
  const int64_t NGk = k_scale.size(2), L = v_scale.size(2);
  KIVI_CHECK(k_ring.sizes() == at::IntArrayRef({B, H, R, D}) && v_ring.sizes() == k_ring.sizes() &&
                 k_zero.sizes() == k_scale.sizes() && k_scale.size(3) == D && k_codes.size(2) == NGk * G * k_bits / 8 &&
                 v_scale.sizes() == at::IntArrayRef({B, H, L, D / G}) && v_zero.sizes() == v_scale.sizes() &&
                 v_codes.sizes() == at::IntArrayRef({B, H, L, D * v_bits / 8}),
             "kivi: _static_append_one_: the store regions do not match k ", k.sizes(), " (ring ", k_ring.sizes(),
             ", key scales ", k_scale.sizes(), ", value scales ", v_scale.sizes(), ")");
  KIVI_CHECK(pos.numel() == 1 && pos.scalar_type() == at::kLong && pos.device() == k.device(),
             "kivi: pos must be an int64 [1] tensor on ", k.device(), ", got ", pos.scalar_type(), " ", pos.sizes());
  if (B * H == 0) return;
  const c10::cuda::CUDAGuard guard(k.device());
  AppendArgs a{k.const_data_ptr(), v.const_data_ptr(), k.stride(0), k.stride(1), k.stride(3), v.stride(0), v.stride(1),
               v.stride(3), pos.const_data_ptr<int64_t>(), k_ring.data_ptr(), k_scale.data_ptr(), k_zero.data_ptr(),
               k_codes.data_ptr<uint8_t>(), v_ring.data_ptr(), v_scale.data_ptr(), v_zero.data_ptr(),
               v_codes.data_ptr<uint8_t>(), static_cast<int>(H), static_cast<int>(D), static_cast<int>(G),
               static_cast<int>(R), NGk, L};
  const size_t smem = static_cast<size_t>(D + 2 * (D / G)) * sizeof(float);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto tag, auto kb, auto vb) {
    using T = typename decltype(tag)::type;
    static_append_one_kernel<T, decltype(kb)::value, decltype(vb)::value>
        <<<static_cast<unsigned>(B * H), kAppendThreads, smem, stream>>>(a);
  };
  dispatch_float(dt, "_static_append_one_", [&](auto tag) {
    dispatch_bits(k_bits, [&](auto kb) { dispatch_bits(v_bits, [&](auto vb) { launch(tag, kb, vb); }); });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace kivi::cuda

TORCH_LIBRARY_IMPL(kivi, CUDA, m) { m.impl("_static_append_one_", &kivi::cuda::static_append_one_); }
