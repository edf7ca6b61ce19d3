// Code rows of a packed KIVI cache as float32, a dot product, and the two folds of the scales: the
// inner loops of the CPU decode-attention and Q_MatMul kernels, written so that the compiler
// vectorizes them (no divisions per element, independent partial sums).
#pragma once
#include <cstdint>
#include <cstring>

// The kernels whose inner loops these are get compiled twice on x86-64 with GCC: for the baseline
// the extension is built for (SSE2, so that it loads on any x86-64 machine) and for x86-64-v3
// (AVX2 + FMA); the loader picks the second where the CPU has it (function multi-versioning,
// `target_clones`, checked by feature: "arch=haswell" would check the CPU model). An AVX-512
// (x86-64-v4) version measured 1.7x slower than v3 at head_dim 128 on the development machine,
// and no faster at 64 (benchmarks/results/2026-11-30-cpu-decode/). KIVI_CPU_INLINE makes the
// helpers part of each version: out of line, GCC compiles them once, for the baseline.
// GCC 12+: the ISA levels as target_clones names (older GCCs build the baseline only).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define KIVI_CPU_MULTIVERSION __attribute__((target_clones("default", "arch=x86-64-v3")))
#else
#define KIVI_CPU_MULTIVERSION
#endif
#if defined(__GNUC__)
#define KIVI_CPU_INLINE inline __attribute__((always_inline))
#else
#define KIVI_CPU_INLINE inline
#endif

namespace kivi::cpu {

// Code row -> float, for the P = 8 / BITS codes of each byte. Keys: codes of one token, channel d
// at byte d, bits [shift, shift + BITS). Values: channel d at byte d / P, bits (d % P) * BITS.
template <int BITS>
KIVI_CPU_INLINE void unpack_key_codes(const uint8_t* row, int shift, int64_t D, float* out) {
  constexpr uint32_t M = (1u << BITS) - 1u;
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>((row[d] >> shift) & M);
}

template <int BITS>
KIVI_CPU_INLINE void unpack_value_codes(const uint8_t* row, int64_t D, float* out) {
  constexpr int P = 8 / BITS;
  constexpr uint32_t M = (1u << BITS) - 1u;
  // Four bytes at a time: channel d0 + k sits at bits k * BITS of their little-endian word, so each
  // of the 4P outputs is one shift by a constant (vectorized), not a byte load per P codes.
  int64_t d = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  for (; d + 4 * P <= D; d += 4 * P) {
    uint32_t w;
    std::memcpy(&w, row + d / P, sizeof(w));
    for (int k = 0; k < 4 * P; ++k) out[d + k] = static_cast<float>((w >> (k * BITS)) & M);
  }
#endif
  for (; d < D; ++d) out[d] = static_cast<float>((row[d / P] >> ((d % P) * BITS)) & M);
}

KIVI_CPU_INLINE void unpack_keys(int bits, const uint8_t* row, int shift, int64_t D, float* out) {
  if (bits == 2) {
    unpack_key_codes<2>(row, shift, D, out);
  } else if (bits == 4) {
    unpack_key_codes<4>(row, shift, D, out);
  } else {
    unpack_key_codes<8>(row, shift, D, out);
  }
}

KIVI_CPU_INLINE void unpack_values(int bits, const uint8_t* row, int64_t D, float* out) {
  if (bits == 2) {
    unpack_value_codes<2>(row, D, out);
  } else if (bits == 4) {
    unpack_value_codes<4>(row, D, out);
  } else {
    unpack_value_codes<8>(row, D, out);
  }
}

// sum_i term(i) for i < n with eight independent partial sums: the compiler vectorizes them (one
// running float sum it may not reorder).
template <typename Term>
KIVI_CPU_INLINE float sum8(int64_t n, Term term) {
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) part[k] += term(i + k);
  }
  float s = 0.f;
  for (; i < n; ++i) s += term(i);
  for (int k = 0; k < 8; ++k) s += part[k];
  return s;
}

KIVI_CPU_INLINE float dot(const float* a, const float* b, int64_t n) {
  return sum8(n, [&](int64_t i) { return a[i] * b[i]; });
}

KIVI_CPU_INLINE float sum_of(const float* x, int64_t n) {
  return sum8(n, [&](int64_t i) { return x[i]; });
}

// x[i] = e^(x[i] - shift) for softmax exponents (shift: the row's max, so x[i] - shift <= 0), in a
// form the compiler vectorizes (std::exp is a scalar libm call, and a slow one where it underflows). Cody-Waite
// reduction x = n ln2 + r (n * kLn2Hi is exact), e^r by its Taylor series to r^7 (|r| <= ln2 / 2:
// relative error < 1e-8, below float32's rounding), 2^n from the exponent bits. Below -87.3, where
// e^x leaves float32's normal range, the result is 0 (e^x < 1.2e-38 next to the row's max of 1).
KIVI_CPU_INLINE void exp_softmax(float* x, int64_t n, float shift) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: (y + kRound) - kRound rounds y to an integer
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] - shift;
    const float vc = v < -87.3f ? -87.3f : v;
    const float nf = (vc * kLog2e + kRound) - kRound;
    const float r = (vc - nf * kLn2Hi) - nf * kLn2Lo;
    float p = 1.f / 5040.f;
    p = p * r + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const int32_t bits = (static_cast<int32_t>(nf) + 127) << 23;  // 2^n, n in [-126, 0]
    float two_n;
    std::memcpy(&two_n, &bits, sizeof(float));
    x[i] = v < -87.3f ? 0.f : p * two_n;
  }
}

// One key group: qs [rows, D] = q * s and qz [rows] = q . z for the float32 query rows qf [rows, D]
// (s, z: the group's scale and zero rows [D]; work: 2 * D floats). A key's score is then
// dot(qs, codes) + qz.
template <typename scalar_t>
KIVI_CPU_INLINE void fold_key_group(const float* qf, const scalar_t* s, const scalar_t* z, int64_t rows, int64_t D, float* work,
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
KIVI_CPU_INLINE void add_value_row(float w, const float* codes, const scalar_t* s, const scalar_t* z, int64_t D, int64_t G,
                          float* acc) {
  for (int64_t g = 0; g < D / G; ++g) {
    const float ws = w * static_cast<float>(s[g]), wz = w * static_cast<float>(z[g]);
    for (int64_t d = g * G; d < (g + 1) * G; ++d) acc[d] += ws * codes[d] + wz;
  }
}

}  // namespace kivi::cpu
