// Register budget of a warp-specialized decode loop (docs/perf_plan.md "Session 7"): the key-score
// role and the value role compiled as separate kernels from kv_tile.cuh's functions, to read ptxas's
// register counts. Not part of the library (setup.py builds csrc/ only); no GPU needed:
//
//   python -c "import sys, pathlib; sys.path.insert(0, '.'); import tests.csrc.test_cuda_compile as t; \
//     rc, log, _ = t._compile(pathlib.Path('scripts/ws_register_budget.cu'), pathlib.Path('/tmp')); \
//     print(rc, t._resources(log))"
//
// nvcc 13.0, sm_90 (2026-11-29): key role 96 registers at 2/2 bits, 93 at 4/4; value role 106 and 96;
// no spills. Today's fused kernel: 163 (2/2, capped for 3 blocks of 4 warps), 183 (4/4).
#include "../csrc/cuda/kv_tile.cuh"
using namespace kivi::cuda;
using namespace kivi::cuda::tile;

template <typename T, int KB, int VB, int D>
__global__ void __launch_bounds__(128) key_role(const uint8_t* kc, const T* ks, float* out, int ntiles, int log2G, float sl2) {
  using GEO = Geo<KB, VB, D, true, true>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tid = lane & 3;
  const uint32_t* qperm = reinterpret_cast<const uint32_t*>(smem + GEO::OFF_QP);
  const float* qz = reinterpret_cast<const float*>(smem + GEO::OFF_QZ);
  unsigned char* wb = smem + GEO::OFF_W + warp * GEO::WARP_BYTES;
  uint32_t* pb = reinterpret_cast<uint32_t*>(wb + GEO::OFF_PB);
  const uint32_t* qmine = qperm + (gid * 4 + tid) * GEO::QPS;
  uint32_t qp[D / 16][4];
  int cur_g = -1;
  float m[2] = {kNegInf, kNegInf}, l[2] = {0.f, 0.f};
  auto stage = [&](int it) {
    stage_keys<GEO, D>(wb + (it % STAGES) * GEO::STAGE_BYTES, kc, reinterpret_cast<const unsigned char*>(ks),
                       (warp + WARPS * it) * TT, TT, log2G, lane);
  };
  stage(0);
  cp_async_commit();
  for (int it = 0; it < ntiles; ++it) {
    if (it + 1 < ntiles) stage(it + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncwarp();
    const unsigned char* st = wb + (it % STAGES) * GEO::STAGE_BYTES;
    float S[GEO::NMT][4];
    key_scores<T, GEO, KB, D>(st, (warp + WARPS * it) * TT, log2G, qmine, qz, 0, qp, cur_g, S, lane);
    float mx0 = kNegInf, mx1 = kNegInf;
#pragma unroll
    for (int mt = 0; mt < GEO::NMT; ++mt) {
#pragma unroll
      for (int c = 0; c < 4; ++c) S[mt][c] *= sl2;
      mx0 = fmaxf(mx0, fmaxf(S[mt][0], S[mt][2]));
      mx1 = fmaxf(mx1, fmaxf(S[mt][1], S[mt][3]));
    }
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(kFull, mx0, o));
      mx1 = fmaxf(mx1, __shfl_xor_sync(kFull, mx1, o));
    }
    const float mn0 = fmaxf(m[0], mx0), mn1 = fmaxf(m[1], mx1);
    const float al0 = fast_exp2(m[0] - mn0), al1 = fast_exp2(m[1] - mn1);
    m[0] = mn0;
    m[1] = mn1;
    float ls0 = 0.f, ls1 = 0.f;
#pragma unroll
    for (int mt = 0; mt < GEO::NMT; ++mt) {
      S[mt][0] = fast_exp2(S[mt][0] - mn0);
      S[mt][2] = fast_exp2(S[mt][2] - mn0);
      S[mt][1] = fast_exp2(S[mt][1] - mn1);
      S[mt][3] = fast_exp2(S[mt][3] - mn1);
      ls0 += S[mt][0] + S[mt][2];
      ls1 += S[mt][1] + S[mt][3];
    }
    l[0] = l[0] * al0 + ls0;
    l[1] = l[1] * al1 + ls1;
    write_pairs<T, GEO>(pb, S, lane);
    if (gid == 0) {  // the rescale factors for the value role
      reinterpret_cast<float*>(pb)[ROWS * PS + 2 * tid] = al0;
      reinterpret_cast<float*>(pb)[ROWS * PS + 2 * tid + 1] = al1;
    }
    __syncwarp();
  }
  out[threadIdx.x * 4 + 0] = m[0];
  out[threadIdx.x * 4 + 1] = m[1];
  out[threadIdx.x * 4 + 2] = l[0];
  out[threadIdx.x * 4 + 3] = l[1];
}

template <typename T, int KB, int VB, int D>
__global__ void __launch_bounds__(128) value_role(const uint8_t* vc, const unsigned char* vs, const unsigned char* vz,
                                                   float* out, int ntiles, int log2G) {
  using GEO = Geo<KB, VB, D, true, true>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, tid = lane & 3;
  const int NG = D >> log2G;
  unsigned char* wb = smem + GEO::OFF_W + warp * GEO::WARP_BYTES;
  uint32_t* sps = reinterpret_cast<uint32_t*>(wb + GEO::OFF_SPS);
  uint32_t* spz = reinterpret_cast<uint32_t*>(wb + GEO::OFF_SPZ);
  const uint32_t* pb = reinterpret_cast<const uint32_t*>(wb + GEO::OFF_PB);
  float acc[D / 16][4], zacc[D / 32][4];
#pragma unroll
  for (int i = 0; i < D / 16; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
  for (int i = 0; i < D / 32; ++i) zacc[i][0] = zacc[i][1] = zacc[i][2] = zacc[i][3] = 0.f;
  auto stage = [&](int it) {
    stage_values<GEO, D>(wb + (it % STAGES) * GEO::STAGE_BYTES, vc, vs, vz, (warp + WARPS * it) * TT, TT, NG, lane);
  };
  stage(0);
  cp_async_commit();
  for (int it = 0; it < ntiles; ++it) {
    if (it + 1 < ntiles) stage(it + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncwarp();
    const unsigned char* st = wb + (it % STAGES) * GEO::STAGE_BYTES;
    const int t0 = (warp + WARPS * it) * TT;
    const int soff = static_cast<int>(reinterpret_cast<uintptr_t>(vs + static_cast<int64_t>(t0) * NG * 2) & 15);
    const int zoff = static_cast<int>(reinterpret_cast<uintptr_t>(vz + static_cast<int64_t>(t0) * NG * 2) & 15);
    transpose_vsz<GEO>(st, sps, spz, soff, zoff, NG, log2G, TT, lane);
    const float al0 = reinterpret_cast<const float*>(pb)[ROWS * PS + 2 * tid];
    const float al1 = reinterpret_cast<const float*>(pb)[ROWS * PS + 2 * tid + 1];
    if (__any_sync(kFull, al0 != 1.f || al1 != 1.f)) {
#pragma unroll
      for (int i = 0; i < D / 16; ++i) {
        acc[i][0] *= al0; acc[i][1] *= al1; acc[i][2] *= al0; acc[i][3] *= al1;
      }
#pragma unroll
      for (int i = 0; i < D / 32; ++i) {
        zacc[i][0] *= al0; zacc[i][1] *= al1; zacc[i][2] *= al0; zacc[i][3] *= al1;
      }
    }
    __syncwarp();
    value_accum<T, GEO, VB, D>(st, sps, spz, pb, acc, zacc, lane);
    __syncwarp();
  }
  write_warp_acc<GEO, D>(out + blockIdx.x * WARPS * ROWS * D, warp, acc, zacc, lane);
}

template __global__ void key_role<__half, 2, 2, 128>(const uint8_t*, const __half*, float*, int, int, float);
template __global__ void key_role<__half, 4, 4, 128>(const uint8_t*, const __half*, float*, int, int, float);
template __global__ void value_role<__half, 2, 2, 128>(const uint8_t*, const unsigned char*, const unsigned char*, float*, int, int);
template __global__ void value_role<__half, 4, 4, 128>(const uint8_t*, const unsigned char*, const unsigned char*, float*, int, int);
