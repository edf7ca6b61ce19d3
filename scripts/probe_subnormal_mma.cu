// Do the H200's tensor cores multiply subnormal fp16 / bf16 operands exactly? (kv_tile.cuh's
// unpack2_codes feeds 2- and 4-bit codes to mma.sync as fp16 subnormals, code * 2^(F*BITS - 24).)
//
//   nvcc -arch=sm_90 -o /tmp/probe scripts/probe_subnormal_mma.cu && /tmp/probe
//
// One m16n8k16 mma per dtype: A = codes 0..3 at field F (every row/k a different code), placed in the
// mantissa under a zero exponent; B = random normal values (bf16: times 2^64, so that the products
// stay normal fp32). Prints the worst relative error against the exact products summed in double,
// and how many outputs came out zero where the exact sum is not (a flush to zero).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

template <bool BF16>
__global__ void mma_kernel(const uint32_t* a, const uint32_t* b, float* d) {
  const int lane = threadIdx.x;
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  const uint32_t* al = a + 4 * lane;
  const uint32_t* bl = b + 2 * lane;
  if constexpr (BF16) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(al[0]), "r"(al[1]), "r"(al[2]), "r"(al[3]), "r"(bl[0]), "r"(bl[1]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(al[0]), "r"(al[1]), "r"(al[2]), "r"(al[3]), "r"(bl[0]), "r"(bl[1]));
  }
  for (int i = 0; i < 4; ++i) d[4 * lane + i] = c[i];
}

static double bits_to_double(uint16_t h, bool bf16) {
  if (bf16) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  return static_cast<double>(__half2float(__ushort_as_half(h)));
}

static uint16_t double_to_bits(double x, bool bf16) {
  if (bf16) {
    float f = static_cast<float>(x);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return static_cast<uint16_t>(u >> 16);  // truncation: the value is exact in the product check
  }
  return __half_as_ushort(__float2half(static_cast<float>(x)));
}

template <bool BF16>
static int run(int bits, int field) {
  // PTX m16n8k16 fragment layouts: A row-major 16x16, B col-major 16x8, D 16x8
  uint16_t A[16][16], B[16][8];
  const double bscale = BF16 ? std::ldexp(1.0, 64) : 1.0;
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 16; ++k) A[r][k] = static_cast<uint16_t>(((r * 7 + k * 3) % (1 << bits)) << (field * bits));
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 8; ++n) B[k][n] = double_to_bits((std::rand() / double(RAND_MAX) - 0.5) * 4.0 * bscale, BF16);
  uint32_t ha[128], hb[64];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    auto pa = [&](int r, int k) { return static_cast<uint32_t>(A[r][k]) | (static_cast<uint32_t>(A[r][k + 1]) << 16); };
    auto pb = [&](int k, int n) { return static_cast<uint32_t>(B[k][n]) | (static_cast<uint32_t>(B[k + 1][n]) << 16); };
    ha[4 * lane + 0] = pa(g, 2 * t);
    ha[4 * lane + 1] = pa(g + 8, 2 * t);
    ha[4 * lane + 2] = pa(g, 2 * t + 8);
    ha[4 * lane + 3] = pa(g + 8, 2 * t + 8);
    hb[2 * lane + 0] = pb(2 * t, g);
    hb[2 * lane + 1] = pb(2 * t + 8, g);
  }
  uint32_t *da, *db;
  float* dd;
  cudaMalloc(&da, sizeof ha);
  cudaMalloc(&db, sizeof hb);
  cudaMalloc(&dd, 128 * sizeof(float));
  cudaMemcpy(da, ha, sizeof ha, cudaMemcpyHostToDevice);
  cudaMemcpy(db, hb, sizeof hb, cudaMemcpyHostToDevice);
  mma_kernel<BF16><<<1, 32>>>(da, db, dd);
  float hd[128];
  cudaMemcpy(hd, dd, sizeof hd, cudaMemcpyDeviceToHost);
  cudaFree(da);
  cudaFree(db);
  cudaFree(dd);
  double worst = 0.0;
  int flushed = 0;
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int r = g + 8 * (i >> 1), n = 2 * t + (i & 1);
      double exact = 0.0;
      for (int k = 0; k < 16; ++k) exact += bits_to_double(A[r][k], BF16) * bits_to_double(B[k][n], BF16);
      const double got = hd[4 * lane + i];
      if (exact != 0.0 && got == 0.0) ++flushed;
      if (exact != 0.0) worst = std::fmax(worst, std::fabs(got - exact) / std::fabs(exact));
    }
  }
  std::printf("%s bits=%d field=%d: worst rel err %.3e, flushed %d of 128\n", BF16 ? "bf16" : "fp16", bits, field,
              worst, flushed);
  return flushed > 0 || worst > 1e-6;
}

int main() {
  int bad = 0;
  for (int bits : {2, 4})
    for (int field = 0; field < 8 / bits; ++field) {
      bad += run<false>(bits, field);
      if (field * bits + bits <= 7) bad += run<true>(bits, field);  // bf16's mantissa is 7 bits
    }
  std::printf(bad ? "SUBNORMAL MMA: INEXACT\n" : "SUBNORMAL MMA: EXACT\n");
  return bad ? 1 : 0;
}
