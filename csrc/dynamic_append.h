// kivi::_dynamic_append_one_: one decode step of the dynamic KIVI cache (KIVIState.append in
// kivi_ops/cache/state.py) in one kernel instead of ~8 ATen ops (two cats, a contiguous copy, a
// value quantize, three copies into the value buffers, a clone). Eager decoding is host-bound, so
// each op costs its launch and dispatch time on every layer of every step.
//
//   k_residual [B, H, r, D]  contiguous   -> returned k_residual' [B, H, r + 1, D] = k_residual ‖ k
//   v_residual [B, H, n, Dv] contiguous   -> returned v_residual' [B, H, n, Dv] = v_residual[:, :, 1:] ‖ v
//   k, v       [B, H, 1, D] / [B, H, 1, Dv], any strides (the model's projections)
//   v_codes [B, H, cap, Dv*bits/8], v_scale / v_zero [B, H, cap, Dv/G]: the value buffers
//     (kivi_ops/cache/row_buffer.py), contiguous; row `row` (< cap) receives v_residual[:, :, 0]
//     quantized per token, bit for bit what kivi::quantize_values writes on the same device.
//
// The caller takes it only when neither residual flushes a block (r + 1 < R, n == R): the key
// flush (kivi::quantize_keys over R tokens) stays a composite. Checks shared by both devices here.
#pragma once
#include <ATen/core/Tensor.h>

#include "check.h"

namespace kivi {

inline void check_dynamic_append_one(const at::Tensor& k_res, const at::Tensor& v_res, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& v_codes, const at::Tensor& v_scale,
                                     const at::Tensor& v_zero, int64_t row, int64_t bits, int64_t G) {
  const auto dt = k_res.scalar_type();
  KIVI_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat,
             "kivi: _dynamic_append_one_: k_residual must be float16, bfloat16 or float32, got ", dt);
  const std::pair<const at::Tensor*, const char*> floats[] = {
      {&v_res, "v_residual"}, {&k, "k"}, {&v, "v"}, {&v_scale, "v_scale"}, {&v_zero, "v_zero"}};
  for (const auto& [t, name] : floats) {
    KIVI_CHECK(t->dim() == 4 && t->scalar_type() == dt, "kivi: _dynamic_append_one_: ", name, " must be a 4-D ",
               dt, " tensor like k_residual, got ", t->scalar_type(), " ", t->sizes());
  }
  KIVI_CHECK(k_res.dim() == 4 && v_codes.dim() == 4 && v_codes.scalar_type() == at::kByte,
             "kivi: _dynamic_append_one_: k_residual must be 4-D and v_codes a 4-D uint8 tensor, got ", k_res.sizes(),
             " and ", v_codes.scalar_type(), " ", v_codes.sizes());
  const std::pair<const at::Tensor*, const char*> all[] = {{&v_res, "v_residual"}, {&k, "k"}, {&v, "v"},
                                                           {&v_codes, "v_codes"}, {&v_scale, "v_scale"},
                                                           {&v_zero, "v_zero"}};
  for (const auto& [t, name] : all) {
    KIVI_CHECK(t->device() == k_res.device(), "kivi: _dynamic_append_one_: ", name, " is on ", t->device(),
               ", k_residual on ", k_res.device());
  }
  KIVI_CHECK(bits == 2 || bits == 4 || bits == 8, "kivi: _dynamic_append_one_: bits must be 2, 4 or 8, got ", bits);
  const int64_t B = k_res.size(0), H = k_res.size(1), D = k_res.size(3), n = v_res.size(2), Dv = v_res.size(3);
  KIVI_CHECK(G > 0 && G % 8 == 0 && Dv % G == 0, "kivi: _dynamic_append_one_: group_size ", G,
             " must be a positive multiple of 8 dividing the value head_dim ", Dv);
  KIVI_CHECK(k.sizes() == at::IntArrayRef({B, H, 1, D}) && v_res.size(0) == B && v_res.size(1) == H && n >= 1 &&
                 v.sizes() == at::IntArrayRef({B, H, 1, Dv}),
             "kivi: _dynamic_append_one_ takes one token: k [", B, ", ", H, ", 1, ", D, "] and v [", B, ", ", H,
             ", 1, ", Dv, "] after v_residual [", B, ", ", H, ", n >= 1, ", Dv, "], got k ", k.sizes(), ", v ",
             v.sizes(), ", v_residual ", v_res.sizes());
  KIVI_CHECK(k_res.is_contiguous() && v_res.is_contiguous(),
             "kivi: _dynamic_append_one_: k_residual and v_residual must be contiguous");
  const int64_t cap = v_codes.size(2);
  KIVI_CHECK(v_codes.sizes() == at::IntArrayRef({B, H, cap, Dv * bits / 8}) &&
                 v_scale.sizes() == at::IntArrayRef({B, H, cap, Dv / G}) && v_zero.sizes() == v_scale.sizes() &&
                 v_codes.is_contiguous() && v_scale.is_contiguous() && v_zero.is_contiguous(),
             "kivi: _dynamic_append_one_: the value buffers must be contiguous [", B, ", ", H, ", capacity, ",
             Dv * bits / 8, "] uint8 and [", B, ", ", H, ", capacity, ", Dv / G, "] (scale, zero), got ",
             v_codes.sizes(), ", ", v_scale.sizes(), ", ", v_zero.sizes());
  KIVI_CHECK(row >= 0 && row < cap, "kivi: _dynamic_append_one_: row ", row, " is outside the value buffers' ", cap,
             " rows (cache overflow: grow the buffers first)");
}

}  // namespace kivi
