// Decode attention's scalar path (decode_attention.cu's attn_generic_kernel): any dtype, bit width,
// head_dim and group size, one token per warp step.
// Included by decode_attention.cu alone, in its anonymous namespace (internal linkage, as there).
#pragma once

#include "attn_params.cuh"

namespace kivi::cuda {
namespace {

using namespace tile;

// ------------------------------------------------------------------------------------------------
// Scalar path: one token per warp step, lanes over channels (d = lane + 32 j), all rows.
// ------------------------------------------------------------------------------------------------
template <typename T, int DJ>
__device__ __forceinline__ void generic_attn_warp(const AttnParams& p, int b, int h, const T* qh, int nrows, int ta,
                                                  int tb, int warp, int lane, float* red_w, float* mw_w, float* lw_w) {
  const int D = p.D, G = p.G, Tk = p.Tk, Tv = p.Tv;
  const auto [kc, ks, kz, vc, vs, vz, kr, vr] = head_cache<T>(p, b, h);
  float q[ROWS][DJ], acc[ROWS][DJ], m[ROWS], l[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    m[r] = kNegInf;
    l[r] = 0.f;
#pragma unroll
    for (int j = 0; j < DJ; ++j) {
      const int d = lane + 32 * j;
      q[r][j] = (r < nrows && d < D) ? to_f(qh[r * D + d]) : 0.f;
      acc[r][j] = 0.f;
    }
  }
  const float sl2 = p.sl2;
  for (int t = ta + warp; t < tb; t += WARPS) {
    // the lane's channels d = lane + 32 j of token t's key and value rows (0 past D)
    float kv[DJ], vv[DJ];
    auto lane_elems = [&](float (&x)[DJ], auto&& elem) {
#pragma unroll
      for (int j = 0; j < DJ; ++j) {
        const int d = lane + 32 * j;
        x[j] = d < D ? elem(d) : 0.f;
      }
    };
    if (t < Tk) {
      lane_elems(kv, [&](int d) { return key_elem<T>(kc, ks, kz, t, d, D, p.kbits, G); });
    } else {
      const T* row = kr + static_cast<int64_t>(t - Tk) * D;
      lane_elems(kv, [&](int d) { return to_f(row[d]); });
    }
    if (t < Tv) {
      lane_elems(vv, [&](int d) { return value_elem<T>(vc, vs, vz, t, d, D, p.vbits, G); });
    } else {
      const T* row = vr + static_cast<int64_t>(t - Tv) * D;
      lane_elems(vv, [&](int d) { return to_f(row[d]); });
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (r < nrows) {
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < DJ; ++j) s = fmaf(q[r][j], kv[j], s);
        const float x = warp_sum(s) * sl2;
        const float mn = fmaxf(m[r], x);
        const float mu = mn == kNegInf ? 0.f : mn;
        const float al = fast_exp2(m[r] - mu), pr = fast_exp2(x - mu);
        l[r] = l[r] * al + pr;
#pragma unroll
        for (int j = 0; j < DJ; ++j) acc[r][j] = fmaf(pr, vv[j], acc[r][j] * al);
        m[r] = mn;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (r < nrows) {
#pragma unroll
      for (int j = 0; j < DJ; ++j) {
        const int d = lane + 32 * j;
        if (d < D) red_w[r * D + d] = acc[r][j];
      }
      if (lane == 0) {
        mw_w[r] = m[r];
        lw_w[r] = l[r];
      }
    }
  }
}

}  // namespace
}  // namespace kivi::cuda
