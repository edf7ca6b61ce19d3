// CPU quantize / dequantize of keys (per-channel groups) and values (per-token groups).
// Layout and numerics: kivi_ops/ops/layout.py.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

namespace kivi::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_keys(const at::Tensor& k_in, int64_t bits, int64_t G) {
  check_bits_group(bits, G);
  check_float_4d(k_in, "k");
  const auto k = k_in.contiguous();
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), D = k.size(3), P = 8 / bits;
  KIVI_CHECK(T % G == 0, "kivi: k's token count (", T, ") must be a multiple of group_size (", G, ")");
  auto codes = at::empty({B, H, T / P, D}, k.options().dtype(at::kByte));
  auto scale = at::empty({B, H, T / G, D}, k.options());
  auto zero = at::empty_like(scale);
  const int64_t n_groups = B * H * (T / G);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "kivi_quantize_keys_cpu", [&] {
    const scalar_t* x = k.const_data_ptr<scalar_t>();
    uint8_t* c = codes.mutable_data_ptr<uint8_t>();
    scalar_t* sc = scale.mutable_data_ptr<scalar_t>();
    scalar_t* ze = zero.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n_groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const scalar_t* xg = x + g * G * D;  // G tokens x D channels, contiguous
        uint8_t* cg = c + g * (G / P) * D;
        for (int64_t d = 0; d < D; ++d) {
          float lo = std::numeric_limits<float>::infinity(), hi = -lo;
          for (int64_t t = 0; t < G; ++t) {
            const float v = static_cast<float>(xg[t * D + d]);
            lo = nan_min(v, lo);
            hi = nan_max(v, hi);
          }
          group_params<scalar_t>(lo, hi, bits, sc[g * D + d], ze[g * D + d]);
          const float s = static_cast<float>(sc[g * D + d]), z = static_cast<float>(ze[g * D + d]);
          for (int64_t r = 0; r < G / P; ++r) {
            uint32_t byte = 0;
            for (int64_t j = 0; j < P; ++j) {
              byte |= static_cast<uint32_t>(encode(static_cast<float>(xg[(r * P + j) * D + d]), s, z, bits)) << (j * bits);
            }
            cg[r * D + d] = static_cast<uint8_t>(byte);
          }
        }
      }
    });
  });
  return {codes, scale, zero};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_values(const at::Tensor& v_in, int64_t bits, int64_t G) {
  check_bits_group(bits, G);
  check_float_4d(v_in, "v");
  const auto v = v_in.contiguous();
  const int64_t B = v.size(0), H = v.size(1), T = v.size(2), D = v.size(3), P = 8 / bits;
  KIVI_CHECK(D % G == 0, "kivi: v's head_dim (", D, ") must be a multiple of group_size (", G, ")");
  auto codes = at::empty({B, H, T, D / P}, v.options().dtype(at::kByte));
  auto scale = at::empty({B, H, T, D / G}, v.options());
  auto zero = at::empty_like(scale);
  const int64_t n_groups = B * H * T * (D / G);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "kivi_quantize_values_cpu", [&] {
    const scalar_t* x = v.const_data_ptr<scalar_t>();
    uint8_t* c = codes.mutable_data_ptr<uint8_t>();
    scalar_t* sc = scale.mutable_data_ptr<scalar_t>();
    scalar_t* ze = zero.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n_groups, 64, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        // G consecutive channels of one token
        quantize_value_group(x + g * G, G, static_cast<int>(bits), sc[g], ze[g], c + g * (G / P));
      }
    });
  });
  return {codes, scale, zero};
}

at::Tensor dequantize_keys(const at::Tensor& codes_in, const at::Tensor& scale_in, const at::Tensor& zero_in,
                           int64_t bits, int64_t G) {
  check_bits_group(bits, G);
  check_packed(codes_in, scale_in, zero_in);
  const auto codes = codes_in.contiguous();
  const auto scale = scale_in.contiguous();
  const auto zero = zero_in.contiguous();
  const int64_t B = codes.size(0), H = codes.size(1), P = 8 / bits, T = codes.size(2) * P, D = codes.size(3);
  KIVI_CHECK(T % G == 0 && scale.size(0) == B && scale.size(1) == H && scale.size(2) == T / G && scale.size(3) == D,
              "kivi: scale/zero must be [B, H, T/G, D] = [", B, ", ", H, ", ", T / G, ", ", D, "] for these codes, got ",
              scale.sizes());
  auto out = at::empty({B, H, T, D}, scale.options());
  const uint32_t mask = (1u << bits) - 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scale.scalar_type(), "kivi_dequantize_keys_cpu", [&] {
    const uint8_t* c = codes.const_data_ptr<uint8_t>();
    const scalar_t* sc = scale.const_data_ptr<scalar_t>();
    const scalar_t* ze = zero.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * H * T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; ++bt) {  // bt = (b*H + h)*T + t
        const int64_t bh = bt / T, t = bt % T, row = bh * (T / P) + t / P, shift = (t % P) * bits;
        const int64_t grp = (bh * (T / G) + t / G) * D;
        for (int64_t d = 0; d < D; ++d) {
          const float q = static_cast<float>((c[row * D + d] >> shift) & mask);
          o[bt * D + d] = static_cast<scalar_t>(q * static_cast<float>(sc[grp + d]) + static_cast<float>(ze[grp + d]));
        }
      }
    });
  });
  return out;
}

at::Tensor dequantize_values(const at::Tensor& codes_in, const at::Tensor& scale_in, const at::Tensor& zero_in,
                             int64_t bits, int64_t G) {
  check_bits_group(bits, G);
  check_packed(codes_in, scale_in, zero_in);
  const auto codes = codes_in.contiguous();
  const auto scale = scale_in.contiguous();
  const auto zero = zero_in.contiguous();
  const int64_t B = codes.size(0), H = codes.size(1), T = codes.size(2), P = 8 / bits, D = codes.size(3) * P;
  KIVI_CHECK(D % G == 0 && scale.size(0) == B && scale.size(1) == H && scale.size(2) == T && scale.size(3) == D / G,
              "kivi: scale/zero must be [B, H, T, D/G] = [", B, ", ", H, ", ", T, ", ", D / G, "] for these codes, got ",
              scale.sizes());
  auto out = at::empty({B, H, T, D}, scale.options());
  const uint32_t mask = (1u << bits) - 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scale.scalar_type(), "kivi_dequantize_values_cpu", [&] {
    const uint8_t* c = codes.const_data_ptr<uint8_t>();
    const scalar_t* sc = scale.const_data_ptr<scalar_t>();
    const scalar_t* ze = zero.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * H * T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; ++bt) {
        for (int64_t d = 0; d < D; ++d) {
          const float q = static_cast<float>((c[bt * (D / P) + d / P] >> ((d % P) * bits)) & mask);
          const int64_t grp = bt * (D / G) + d / G;
          o[bt * D + d] = static_cast<scalar_t>(q * static_cast<float>(sc[grp]) + static_cast<float>(ze[grp]));
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace kivi::cpu

TORCH_LIBRARY_IMPL(kivi, CPU, m) {
  m.impl("quantize_keys", &kivi::cpu::quantize_keys);
  m.impl("quantize_values", &kivi::cpu::quantize_values);
  m.impl("dequantize_keys", &kivi::cpu::dequantize_keys);
  m.impl("dequantize_values", &kivi::cpu::dequantize_values);
}
