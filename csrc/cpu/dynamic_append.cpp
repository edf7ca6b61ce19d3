// CPU kivi::_dynamic_append_one_: one decode step of the dynamic KIVI cache (csrc/dynamic_append.h
// has the contract). One task per (batch, head): two row copies and one value row quantized with
// quantize_values' numerics (common.h: quantize_value_group), so the bytes equal the composite's.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "../dynamic_append.h"
#include "common.h"

namespace kivi::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> dynamic_append_one_(const at::Tensor& k_res, const at::Tensor& v_res,
                                                       const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& v_codes, const at::Tensor& v_scale,
                                                       const at::Tensor& v_zero, int64_t row, int64_t bits,
                                                       int64_t G) {
  check_dynamic_append_one(k_res, v_res, k, v, v_codes, v_scale, v_zero, row, bits, G);
  KIVI_CHECK(k_res.device().is_cpu(), "kivi: _dynamic_append_one_: the CPU kernel needs CPU tensors, got ",
             k_res.device());
  const int64_t B = k_res.size(0), H = k_res.size(1), r = k_res.size(2), D = k_res.size(3);
  const int64_t n = v_res.size(2), Dv = v_res.size(3), cap = v_codes.size(2), P = 8 / bits;
  auto k_out = at::empty({B, H, r + 1, D}, k_res.options());
  auto v_out = at::empty({B, H, n, Dv}, v_res.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_res.scalar_type(), "kivi_dynamic_append_one_cpu", [&] {
    const scalar_t* kr = k_res.const_data_ptr<scalar_t>();
    const scalar_t* vr = v_res.const_data_ptr<scalar_t>();
    const scalar_t* kn = k.const_data_ptr<scalar_t>();
    const scalar_t* vn = v.const_data_ptr<scalar_t>();
    scalar_t* ko = k_out.mutable_data_ptr<scalar_t>();
    scalar_t* vo = v_out.mutable_data_ptr<scalar_t>();
    uint8_t* vc = v_codes.mutable_data_ptr<uint8_t>();
    scalar_t* vs = v_scale.mutable_data_ptr<scalar_t>();
    scalar_t* vz = v_zero.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        // keys: the residual, then the new key (k's strides are the model's: element by element)
        std::memcpy(ko + bh * (r + 1) * D, kr + bh * r * D, sizeof(scalar_t) * r * D);
        const scalar_t* krow = kn + b * k.stride(0) + h * k.stride(1);
        for (int64_t d = 0; d < D; ++d) ko[(bh * (r + 1) + r) * D + d] = krow[d * k.stride(3)];
        // values: the oldest residual row leaves the window, quantized into the buffers' row `row`
        const scalar_t* oldest = vr + bh * n * Dv;
        const int64_t dst = bh * cap + row;  // row index into the [B*H*cap] buffers
        for (int64_t g = 0; g < Dv / G; ++g) {
          quantize_value_group(oldest + g * G, G, static_cast<int>(bits), vs[dst * (Dv / G) + g],
                               vz[dst * (Dv / G) + g], vc + dst * (Dv / P) + g * (G / P));
        }
        std::memcpy(vo + bh * n * Dv, oldest + Dv, sizeof(scalar_t) * (n - 1) * Dv);
        const scalar_t* vrow = vn + b * v.stride(0) + h * v.stride(1);
        for (int64_t d = 0; d < Dv; ++d) vo[(bh * n + n - 1) * Dv + d] = vrow[d * v.stride(3)];
      }
    });
  });
  return {k_out, v_out};
}

}  // namespace
}  // namespace kivi::cpu

TORCH_LIBRARY_IMPL(kivi, CPU, m) { m.impl("_dynamic_append_one_", &kivi::cpu::dynamic_append_one_); }
