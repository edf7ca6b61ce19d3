// Dequantize one token's key or value row into float32: the building block of the CPU Q_MatMul
// kernels (which favour clarity; the GPU kernels are the fast path). CPU decode attention has its
// own vectorizable loops (decode_attention.cpp).
#pragma once
#include <ATen/ATen.h>

namespace kivi::cpu {

// Key row t of one (b, h): codes [T/P, D] + scale/zero [T/G, D] of that head.
template <typename scalar_t>
inline void key_row(const uint8_t* codes, const scalar_t* scale, const scalar_t* zero, int64_t t, int64_t D,
                    int bits, int64_t G, float* out) {
  const int P = 8 / bits, shift = (t % P) * bits;
  const uint32_t mask = (1u << bits) - 1;
  const uint8_t* row = codes + (t / P) * D;
  const scalar_t* s = scale + (t / G) * D;
  const scalar_t* z = zero + (t / G) * D;
  for (int64_t d = 0; d < D; ++d) {
    out[d] = static_cast<float>((row[d] >> shift) & mask) * static_cast<float>(s[d]) + static_cast<float>(z[d]);
  }
}

// Value row t of one (b, h): codes [T, D/P] + scale/zero [T, D/G] of that head.
template <typename scalar_t>
inline void value_row(const uint8_t* codes, const scalar_t* scale, const scalar_t* zero, int64_t t, int64_t D,
                      int bits, int64_t G, float* out) {
  const int P = 8 / bits;
  const uint32_t mask = (1u << bits) - 1;
  const uint8_t* row = codes + t * (D / P);
  const scalar_t* s = scale + t * (D / G);
  const scalar_t* z = zero + t * (D / G);
  for (int64_t d = 0; d < D; ++d) {
    out[d] = static_cast<float>((row[d / P] >> ((d % P) * bits)) & mask) * static_cast<float>(s[d / G]) +
             static_cast<float>(z[d / G]);
  }
}

}  // namespace kivi::cpu
