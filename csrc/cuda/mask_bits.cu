// kivi::_mask_bits on CUDA: a bool key mask [Bm, L] (any strides) packed into int32 words
// [Bm, ceil(L / 32)] in one kernel: bit j of word w = mask[b, 32 w + j], bits past L zero (the ATen
// composite in csrc/static_cache.cpp defines the result; tests/cache/test_static.py compares them).
// One thread per mask position; a warp's ballot is one word, so the loads are coalesced.
#include <torch/library.h>

#include "common.cuh"

namespace kivi::cuda {
namespace {

constexpr int kMaskThreads = 256;

__global__ void __launch_bounds__(kMaskThreads) mask_bits_kernel(const bool* __restrict__ mask, int64_t s_b,
                                                                 int64_t s_l, int64_t L, int64_t W,
                                                                 int32_t* __restrict__ words) {
  const int64_t b = blockIdx.y;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kMaskThreads + threadIdx.x;  // a position, padded to 32
  const bool on = t < L && mask[b * s_b + t * s_l];
  const unsigned word = __ballot_sync(0xffffffffu, on);
  if ((threadIdx.x & 31) == 0 && (t >> 5) < W) words[b * W + (t >> 5)] = static_cast<int32_t>(word);
}

at::Tensor mask_bits(const at::Tensor& mask) {
  KIVI_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2,
             "kivi: _mask_bits: mask must be a bool [batch, positions] tensor, got ", mask.scalar_type(), " ",
             mask.sizes());
  const int64_t Bm = mask.size(0), L = mask.size(1), W = (L + 31) / 32;
  auto words = at::empty({Bm, W}, mask.options().dtype(at::kInt));
  if (Bm == 0 || W == 0) return words;
  KIVI_CHECK(Bm <= 65535, "kivi: _mask_bits: at most 65535 mask rows, got ", Bm);
  const c10::cuda::CUDAGuard guard(mask.device());
  const dim3 grid(static_cast<unsigned>((W * 32 + kMaskThreads - 1) / kMaskThreads), static_cast<unsigned>(Bm));
  mask_bits_kernel<<<grid, kMaskThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      mask.const_data_ptr<bool>(), mask.stride(0), mask.stride(1), L, W, words.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return words;
}

}  // namespace
}  // namespace kivi::cuda

TORCH_LIBRARY_IMPL(kivi, CUDA, m) { m.impl("_mask_bits", &kivi::cuda::mask_bits); }
