// Code rows of a packed KIVI cache as float32, and a dot product: the inner loops of the CPU
// decode-attention and Q_MatMul kernels, written so that the compiler vectorizes them (no divisions
// per element, independent partial sums).
#pragma once
#include <cstdint>

namespace kivi::cpu {

// Code row -> float, for the P = 8 / BITS codes of each byte. Keys: codes of one token, channel d
// at byte d, bits [shift, shift + BITS). Values: channel d at byte d / P, bits (d % P) * BITS.
template <int BITS>
inline void unpack_key_codes(const uint8_t* row, int shift, int64_t D, float* out) {
  constexpr uint32_t M = (1u << BITS) - 1u;
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>((row[d] >> shift) & M);
}

template <int BITS>
inline void unpack_value_codes(const uint8_t* row, int64_t D, float* out) {
  constexpr int P = 8 / BITS;
  constexpr uint32_t M = (1u << BITS) - 1u;
  for (int64_t j = 0; j < D / P; ++j) {
    const uint32_t b = row[j];
    for (int k = 0; k < P; ++k) out[j * P + k] = static_cast<float>((b >> (k * BITS)) & M);
  }
}

inline void unpack_keys(int bits, const uint8_t* row, int shift, int64_t D, float* out) {
  if (bits == 2) {
    unpack_key_codes<2>(row, shift, D, out);
  } else if (bits == 4) {
    unpack_key_codes<4>(row, shift, D, out);
  } else {
    unpack_key_codes<8>(row, shift, D, out);
  }
}

inline void unpack_values(int bits, const uint8_t* row, int64_t D, float* out) {
  if (bits == 2) {
    unpack_value_codes<2>(row, D, out);
  } else if (bits == 4) {
    unpack_value_codes<4>(row, D, out);
  } else {
    unpack_value_codes<8>(row, D, out);
  }
}

// Eight independent partial sums: the compiler vectorizes them (one running sum it may not reorder).
inline float dot(const float* a, const float* b, int64_t n) {
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) part[k] += a[i + k] * b[i + k];
  }
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int k = 0; k < 8; ++k) s += part[k];
  return s;
}

}  // namespace kivi::cpu
