// Token splits: a kernel that spreads one sequence's tokens over `S` blocks (so that a single sequence
// fills the GPU) writes one float32 partial per (row, split) to a workspace [rows, S, D], and
// split_combine_kernel merges them, one block per row. Shared by decode attention (partials of an
// online softmax: acc, m, l) and Q_MatMul's values (plain partial sums). Also the host side: how many
// splits (plan_bulk_splits) and the combine's launch (launch_split_combine).
#pragma once

#include "common.cuh"

namespace kivi::cuda {
// Internal linkage, as each kernel had in its .cu file: every source that includes this compiles and
// registers its own copy of the combine kernels (no template kernel shared across translation units).
namespace {

// The splits are spread over (VEC-channel piece, split slice): a thread loads the VEC channels (and
// for a softmax (m, l)) of a batch of its splits, all independent and in flight at once, then merges
// them (online, with its own running max, for a softmax); the slices then merge through shared
// memory. Computing the weights first (max, then 2^(m_s - M), then the channel loads) took three L2
// round trips per split: 0.4-0.9 us more per call at batch 1 (benchmarks/results/2026-11-30-h200-combine-1pass).
constexpr int COMBINE_THREADS = 256;
// Splits a thread loads before it merges any: a batch of 8 holds every split of a row of up to 64
// splits (8 slices at D = 128), one L2 round trip. A `#pragma unroll 4` loop over the run-time
// count waited on each split's loads in turn (SASS; kept at 70236b9 as -DKIVI_COMBINE_BATCH=0, the
// A/B of benchmarks/results/2026-11-30-h200-70236b9).
constexpr int kCombineBatch = 8;

// SOFTMAX: out[row] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, with ws_ml [rows, S, 2] the
// splits' (m in log2 units, l); a split with no token has m = -inf, l = 0, acc = 0.
// Otherwise out[row] = sum_s acc_s (ws_ml unused).
template <typename T, int VEC, bool SOFTMAX>
__global__ void __launch_bounds__(COMBINE_THREADS) split_combine_kernel(const float* __restrict__ ws_acc,
                                                                        const float* __restrict__ ws_ml,
                                                                        T* __restrict__ out, int S, int D,
                                                                        int trigger_next) {
  extern __shared__ float csm[];  // part[COMBINE_THREADS * VEC], then per slice m and l
  const int tid = threadIdx.x;
  const int pieces = D / VEC, slices = COMBINE_THREADS / pieces;  // host: pieces <= COMBINE_THREADS
  const int piece = tid % pieces, slice = tid / pieces;
  float* part = csm;
  float* slice_m = part + COMBINE_THREADS * VEC;
  float* slice_l = slice_m + slices;
  const int64_t row = blockIdx.x;
  // trigger_next (KIVI_ATTN_PDL=3): the next kernel may launch now, while the split kernel's last blocks
  // still run (it waits for this grid's end); else it launches as this grid's blocks end
  if (trigger_next) pdl_launch_dependents();
  pdl_wait_primary();  // launched early (programmatic dependent launch): the splits' partials are ready past here
  const float* ml = ws_ml + row * S * 2;
  const float* acc = ws_acc + row * S * D;

  float m = kNegInf, l = 0.f, a[VEC] = {};
  // merges split (ms, v) into the thread's running (m, l, a)
  auto merge = [&](float2 ms, const float (&v)[VEC]) {
    if constexpr (SOFTMAX) {
      const float mn = fmaxf(m, ms.x);
      const float mu = mn == kNegInf ? 0.f : mn;
      const float f_old = fast_exp2(m - mu), f_new = fast_exp2(ms.x - mu);
      l = fmaf(f_new, ms.y, l * f_old);
#pragma unroll
      for (int i = 0; i < VEC; ++i) a[i] = fmaf(f_new, v[i], a[i] * f_old);
      m = mn;
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) a[i] += v[i];
    }
  };
  auto load = [&](int s, float2& ms, float (&v)[VEC]) {
    if constexpr (SOFTMAX) ms = *reinterpret_cast<const float2*>(ml + 2 * s);
    const float* src = acc + static_cast<int64_t>(s) * D + piece * VEC;
    if constexpr (VEC == 4) {
      const float4 v4 = *reinterpret_cast<const float4*>(src);
      v[0] = v4.x, v[1] = v4.y, v[2] = v4.z, v[3] = v4.w;
    } else {
      v[0] = *src;
    }
  };
  if (slice < slices) {
    for (int s0 = slice; s0 < S; s0 += kCombineBatch * slices) {
      float2 ms[kCombineBatch];
      float v[kCombineBatch][VEC];
#pragma unroll
      for (int j = 0; j < kCombineBatch; ++j) {
        if (s0 + j * slices < S) {
          load(s0 + j * slices, ms[j], v[j]);
        } else {  // weight 2^-inf = 0
          ms[j] = make_float2(kNegInf, 0.f);
#pragma unroll
          for (int i = 0; i < VEC; ++i) v[j][i] = 0.f;
        }
      }
#pragma unroll
      for (int j = 0; j < kCombineBatch; ++j) merge(ms[j], v[j]);
    }
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) part[tid * VEC + i] = a[i];
  if constexpr (SOFTMAX) {
    if (piece == 0 && slice < slices) {
      slice_m[slice] = m;
      slice_l[slice] = l;
    }
  }
  __syncthreads();
  if constexpr (SOFTMAX) {
    float M = kNegInf;
    for (int sl = 0; sl < slices; ++sl) M = fmaxf(M, slice_m[sl]);
    const float mu = M == kNegInf ? 0.f : M;
    for (int d = tid; d < D; d += COMBINE_THREADS) {
      const int pc = d / VEC, i = d % VEC;
      float sum = 0.f, ls = 0.f;
      for (int sl = 0; sl < slices; ++sl) {
        const float f = fast_exp2(slice_m[sl] - mu);
        sum = fmaf(f, part[(sl * pieces + pc) * VEC + i], sum);
        ls = fmaf(f, slice_l[sl], ls);
      }
      out[row * D + d] = from_f<T>(sum / ls);  // 0/0 = NaN: no valid token, like the reference
    }
  } else {
    for (int d = tid; d < D; d += COMBINE_THREADS) {
      const int pc = d / VEC, i = d % VEC;
      float sum = 0.f;
      for (int sl = 0; sl < slices; ++sl) sum += part[(sl * pieces + pc) * VEC + i];
      out[row * D + d] = from_f<T>(sum);
    }
  }
}

// Launches split_combine_kernel on `stream` over the workspace of the split kernel just launched
// there: ws_acc [rows, S, D] and, for a softmax, ws_ml [rows, S, 2] (unused for plain sums) into out
// [rows, D] of `dtype`. Programmatic dependent launch (sm_90+): the combine's launch and block
// placement overlap the split kernel's last blocks instead of following its end (the split kernel
// calls pdl_launch_dependents; measured on decode attention: 0.4-0.7 us at batch 1, 4k; within noise
// elsewhere). KIVI_ATTN_PDL=0 launches it plainly (A/B knob, for both ops; pdl_level).
template <bool SOFTMAX>
void launch_split_combine(at::ScalarType dtype, const float* ws_acc, const float* ws_ml, void* out, int64_t rows,
                          int S, int64_t D, cudaStream_t stream, int dev) {
  const bool vec4 = D % 4 == 0;
  const size_t smem = (COMBINE_THREADS * (vec4 ? 4 : 1) + 2 * COMBINE_THREADS) * sizeof(float);
  KIVI_CHECK(D <= COMBINE_THREADS, "kivi: internal error: head_dim ", D, " over the combine's ", COMBINE_THREADS);
  const int pdl = pdl_level(dev);
  const LaunchConfig launch_cfg(dim3(static_cast<unsigned>(rows)), dim3(COMBINE_THREADS), smem, stream,
                                pdl >= 1);
  const int trigger_next = pdl >= 3;
  const int Di = static_cast<int>(D);
  dispatch_float(dtype, "split_combine", [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* o = static_cast<T*>(out);
    auto launch = [&](auto kernel) {
      C10_CUDA_CHECK(cudaLaunchKernelEx(&launch_cfg.cfg, kernel, ws_acc, ws_ml, o, S, Di, trigger_next));
    };
    vec4 ? launch(split_combine_kernel<T, 4, SOFTMAX>) : launch(split_combine_kernel<T, 1, SOFTMAX>);
  });
}

// Splits per (KV head, row chunk) for `tiles` 64-token tiles, at most `cap` tiles each, when nbh
// (KV head, row chunk) pairs share `slots` resident blocks. The main loop is issue-bound, so the time
// is set by the slot that runs the most tiles: rounds x tiles per block (+ ~2 tiles of prologue per
// block), with rounds = ceil(all blocks / slots) (measured on decode attention). Tries each count
// from the fewest the cap allows.
inline int plan_bulk_splits(int tiles, int cap, int64_t nbh, int64_t slots) {
  const int lo = static_cast<int>((tiles + cap - 1) / cap);
  const int hi = std::min<int64_t>(tiles, std::max<int64_t>(lo, slots / nbh) * 4 + 16);
  int best = lo;
  int64_t best_cost = -1;
  for (int n = lo; n <= hi; ++n) {
    const int64_t rounds = (nbh * n + slots - 1) / slots;
    const int64_t cost = rounds * ((tiles + n - 1) / n + 2);
    if (best_cost < 0 || cost < best_cost) {
      best = n;
      best_cost = cost;
    }
  }
  return best;
}

}  // namespace
}  // namespace kivi::cuda
