// Shared by the CPU kernels: input checks that name the argument, and the KIVI numerics of
// kivi_ops/ops/layout.py (kept identical to the reference so codes match bit for bit).
#pragma once
#include <ATen/ATen.h>

#include "../check.h"
#include "../tensor_rows.h"
#include <cmath>
#include <limits>
#include <type_traits>

namespace kivi::cpu {

inline void check_bits_group(int64_t bits, int64_t group_size) {
  KIVI_CHECK(bits == 2 || bits == 4 || bits == 8, "kivi: bits must be 2, 4 or 8, got ", bits);
  KIVI_CHECK(group_size > 0 && group_size % 8 == 0,
              "kivi: group_size must be a positive multiple of 8, got ", group_size);
}

inline void check_float_4d(const at::Tensor& t, const char* name) {
  KIVI_CHECK(t.dim() == 4, "kivi: ", name, " must be 4-D, got ", t.dim(), "-D");
  KIVI_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat,
              "kivi: ", name, " must be float16, bfloat16 or float32, got ", t.scalar_type());
  KIVI_CHECK(t.device().is_cpu(), "kivi: ", name, " must be a CPU tensor for the CPU kernel, got ", t.device());
}

inline void check_packed(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero) {
  KIVI_CHECK(codes.dim() == 4 && codes.scalar_type() == at::kByte, "kivi: codes must be a 4-D uint8 tensor");
  KIVI_CHECK(codes.device().is_cpu(), "kivi: codes must be a CPU tensor for the CPU kernel");
  check_float_4d(scale, "scale");
  check_float_4d(zero, "zero");
  KIVI_CHECK(scale.sizes() == zero.sizes() && scale.scalar_type() == zero.scalar_type(),
              "kivi: scale and zero must have the same shape and dtype");
}

// Elements from t's start to the first element of (batch b, head h) (of a rows_contiguous tensor).
inline int64_t head_offset(const at::Tensor& t, int64_t b, int64_t h) { return b * t.stride(0) + h * t.stride(1); }

// Min/max that propagate NaN (std::min drops it depending on argument order).
inline float nan_min(float a, float b) { return (std::isnan(a) || a < b) ? a : b; }
inline float nan_max(float a, float b) { return (std::isnan(a) || a > b) ? a : b; }

// Cast a non-negative float to scalar_t rounding up (nearest, then one step up if it fell below):
// the stored scale never undershoots, so the top code never clamps.
template <typename scalar_t>
inline scalar_t round_up_cast(float x) {
  scalar_t y = static_cast<scalar_t>(x);
  if constexpr (std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (static_cast<float>(y) < x) y.x += 1;  // Half and BFloat16 keep their bits in .x
  }
  return y;
}

// One group's stored scale/zero from its float32 min/max; a non-finite group -> NaN, NaN.
template <typename scalar_t>
inline void group_params(float lo, float hi, int bits, scalar_t& scale, scalar_t& zero) {
  scale = round_up_cast<scalar_t>((hi - lo) / static_cast<float>((1 << bits) - 1));
  zero = static_cast<scalar_t>(lo);
  if (!std::isfinite(static_cast<float>(scale)) || !std::isfinite(static_cast<float>(zero))) {
    scale = zero = static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());
  }
}

inline uint8_t encode(float x, float s, float z, int bits) {
  if (!(s > 0.f)) return 0;
  float c = std::floor((x - z) / s + 0.5f);
  c = std::min(std::max(c, 0.f), static_cast<float>((1 << bits) - 1));
  return static_cast<uint8_t>(c);
}

// One value group (G consecutive channels of one token, xg) -> its scale, zero and G * bits / 8
// code bytes: the per-token numerics of quantize_values, shared with _dynamic_append_one_.
template <typename scalar_t>
inline void quantize_value_group(const scalar_t* xg, int64_t G, int bits, scalar_t& scale, scalar_t& zero,
                                 uint8_t* codes) {
  const int64_t P = 8 / bits;
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  for (int64_t i = 0; i < G; ++i) {
    lo = nan_min(static_cast<float>(xg[i]), lo);
    hi = nan_max(static_cast<float>(xg[i]), hi);
  }
  group_params<scalar_t>(lo, hi, bits, scale, zero);
  const float s = static_cast<float>(scale), z = static_cast<float>(zero);
  for (int64_t b = 0; b < G / P; ++b) {
    uint32_t byte = 0;
    for (int64_t j = 0; j < P; ++j) {
      byte |= static_cast<uint32_t>(encode(static_cast<float>(xg[b * P + j]), s, z, bits)) << (j * bits);
    }
    codes[b] = static_cast<uint8_t>(byte);
  }
}

}  // namespace kivi::cpu
