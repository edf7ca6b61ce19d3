// CUDA kivi::_dynamic_append_one_: one decode step of the dynamic KIVI cache in one kernel
// (csrc/dynamic_append.h has the contract). One block per (batch, head):
//   keys:   k_residual's r rows, then the new key        -> k_out [r + 1, D]
//   values: the oldest residual row quantized into row `row` of the value buffers
//           (quantize_value_row: kivi::quantize_values' numerics), rows 1..n-1 and the new value
//           -> v_out [n, Dv]
// The row copies are 16-byte vectors where both sides allow it (the usual case: D * element size a
// multiple of 16), else element by element.
#include <torch/library.h>

#include "../dynamic_append.h"
#include "common.cuh"

namespace kivi::cuda {
namespace {

constexpr int kThreads = 128;

struct DynAppendArgs {
  const void* k_res;  // [B, H, r, D] contiguous
  const void* v_res;  // [B, H, n, Dv] contiguous
  const void* k;      // new key (b, h, d) at b * k_sB + h * k_sH + d * k_sD
  const void* v;
  int64_t k_sB, k_sH, k_sD, v_sB, v_sH, v_sD;
  void* k_out;  // [B, H, r + 1, D]
  void* v_out;  // [B, H, n, Dv]
  uint8_t* v_codes;  // [B, H, cap, Dv * VB / 8]
  void* v_scale;     // [B, H, cap, Dv / G]
  void* v_zero;
  int64_t cap, row;
  int H, r, D, n, Dv, G;
};

// Copy `bytes` bytes from src to dst with the block's threads (16-byte vectors when both are aligned).
__device__ __forceinline__ void block_copy(void* dst, const void* src, int64_t bytes) {
  if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) == 0 && bytes % 16 == 0) {
    for (int64_t i = threadIdx.x; i < bytes / 16; i += blockDim.x) {
      static_cast<uint4*>(dst)[i] = static_cast<const uint4*>(src)[i];
    }
  } else {
    for (int64_t i = threadIdx.x; i < bytes; i += blockDim.x) {
      static_cast<uint8_t*>(dst)[i] = static_cast<const uint8_t*>(src)[i];
    }
  }
}

template <typename T, int VB>
__global__ void __launch_bounds__(kThreads) dynamic_append_one_kernel(const __grid_constant__ DynAppendArgs a) {
  extern __shared__ float sm[];  // [Dv] the leaving value row as float, then [2 * Dv/G] (scale, zero)
  const int64_t bh = blockIdx.x;
  const int b = static_cast<int>(bh / a.H), h = static_cast<int>(bh % a.H);
  const int D = a.D, Dv = a.Dv, r = a.r, n = a.n;

  const T* oldest = static_cast<const T*>(a.v_res) + bh * n * Dv;
  float* vf = sm;
  for (int d = threadIdx.x; d < Dv; d += blockDim.x) vf[d] = to_f(oldest[d]);

  T* k_out = static_cast<T*>(a.k_out) + bh * (r + 1) * D;
  block_copy(k_out, static_cast<const T*>(a.k_res) + bh * r * D, static_cast<int64_t>(r) * D * sizeof(T));
  const T* krow = static_cast<const T*>(a.k) + b * a.k_sB + h * a.k_sH;
  for (int d = threadIdx.x; d < D; d += blockDim.x) k_out[static_cast<int64_t>(r) * D + d] = krow[d * a.k_sD];

  T* v_out = static_cast<T*>(a.v_out) + bh * n * Dv;
  block_copy(v_out, oldest + Dv, static_cast<int64_t>(n - 1) * Dv * sizeof(T));
  const T* vrow = static_cast<const T*>(a.v) + b * a.v_sB + h * a.v_sH;
  for (int d = threadIdx.x; d < Dv; d += blockDim.x) v_out[static_cast<int64_t>(n - 1) * Dv + d] = vrow[d * a.v_sD];

  __syncthreads();  // vf complete
  const int64_t dst = bh * a.cap + a.row;
  quantize_value_row<T, VB>(vf, sm + Dv, Dv, a.G, static_cast<T*>(a.v_scale) + dst * (Dv / a.G),
                            static_cast<T*>(a.v_zero) + dst * (Dv / a.G), a.v_codes + dst * (Dv * VB / 8));
}

std::tuple<at::Tensor, at::Tensor> dynamic_append_one_(const at::Tensor& k_res, const at::Tensor& v_res,
                                                       const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& v_codes, const at::Tensor& v_scale,
                                                       const at::Tensor& v_zero, int64_t row, int64_t bits,
                                                       int64_t G) {
  check_dynamic_append_one(k_res, v_res, k, v, v_codes, v_scale, v_zero, row, bits, G);
  KIVI_CHECK(k_res.is_cuda(), "kivi: _dynamic_append_one_: the CUDA kernel needs CUDA tensors, got ", k_res.device());
  const int64_t B = k_res.size(0), H = k_res.size(1), r = k_res.size(2), D = k_res.size(3);
  const int64_t n = v_res.size(2), Dv = v_res.size(3);
  KIVI_CHECK(r + 1 <= INT32_MAX / std::max<int64_t>(D, 1) && n <= INT32_MAX / std::max<int64_t>(Dv, 1) && Dv <= 8192,
             "kivi: _dynamic_append_one_: residual of ", r, " x ", D, " / ", n, " x ", Dv, " is too large");
  const c10::cuda::CUDAGuard guard(k_res.device());
  auto k_out = at::empty({B, H, r + 1, D}, k_res.options());
  auto v_out = at::empty({B, H, n, Dv}, v_res.options());
  if (B * H == 0) return {k_out, v_out};
  DynAppendArgs a{k_res.const_data_ptr(), v_res.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(),
                  k.stride(0), k.stride(1), k.stride(3), v.stride(0), v.stride(1), v.stride(3),
                  k_out.data_ptr(), v_out.data_ptr(), v_codes.data_ptr<uint8_t>(), v_scale.data_ptr(),
                  v_zero.data_ptr(), v_codes.size(2), row, static_cast<int>(H), static_cast<int>(r),
                  static_cast<int>(D), static_cast<int>(n), static_cast<int>(Dv), static_cast<int>(G)};
  const size_t smem = static_cast<size_t>(Dv + 2 * (Dv / G)) * sizeof(float);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(k_res.scalar_type(), "_dynamic_append_one_", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_bits(bits, [&](auto vb) {
      dynamic_append_one_kernel<T, decltype(vb)::value>
          <<<static_cast<unsigned>(B * H), kThreads, smem, stream>>>(a);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {k_out, v_out};
}

}  // namespace
}  // namespace kivi::cuda

TORCH_LIBRARY_IMPL(kivi, CUDA, m) { m.impl("_dynamic_append_one_", &kivi::cuda::dynamic_append_one_); }
