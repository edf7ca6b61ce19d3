// Code rows of a packed KIVI cache as float32, a dot product, and the two folds of the scales: the
// inner loops of the CPU decode-attention and Q_MatMul kernels, written so that the compiler
// vectorizes them (no divisions per element, independent partial sums).
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

// One key group: qs [rows, D] = q * s and qz [rows] = q . z for the float32 query rows qf [rows, D]
// (s, z: the group's scale and zero rows [D]; work: 2 * D floats). A key's score is then
// dot(qs, codes) + qz.
template <typename scalar_t>
inline void fold_key_group(const float* qf, const scalar_t* s, const scalar_t* z, int64_t rows, int64_t D, float* work,
                           float* qs, float* qz) {
  float* sv = work;
  float* zv = work + D;
  for (int64_t d = 0; d < D; ++d) {
    sv[d] = static_cast<float>(s[d]);
    zv[d] = static_cast<float>(z[d]);
  }
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t d = 0; d < D; ++d) qs[i * D + d] = qf[i * D + d] * sv[d];
    qz[i] = dot(qf + i * D, zv, D);
  }
}

// acc [D] += w * (s_g * codes + z_g): one value row (codes [D] as float, s and z [D / G]) weighted by w.
template <typename scalar_t>
inline void add_value_row(float w, const float* codes, const scalar_t* s, const scalar_t* z, int64_t D, int64_t G,
                          float* acc) {
  for (int64_t g = 0; g < D / G; ++g) {
    const float ws = w * static_cast<float>(s[g]), wz = w * static_cast<float>(z[g]);
    for (int64_t d = g * G; d < (g + 1) * G; ++d) acc[d] += ws * codes[d] + wz;
  }
}

}  // namespace kivi::cpu
