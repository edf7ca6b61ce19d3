// Decode attention's tail path: the tokens past the bulk tiles (packed keys with full-precision
// values, then the residuals), run by the fused kernel's tail chunks (decode_attention.cu).
// Included by decode_attention.cu alone, in its anonymous namespace (internal linkage, as there).
#pragma once

#include "attn_params.cuh"

namespace kivi::cuda {
namespace {

using namespace tile;

// ------------------------------------------------------------------------------------------------
// Tail path of the fast kernel: the tokens past the bulk tiles (packed keys with full-precision
// values, then the residuals; ~130-190 tokens in a KIVI cache), 4 tokens per warp step. Scores:
// 8 lanes per token, each loading its eighth of the key row at once; values: lane = D/32
// channels, the 4 tokens' loads issued with the keys' and converted after the softmax. A step is
// then one memory round trip; the scalar path waits one per token, and lane = token (a whole key
// row per lane) needs too many registers in flight next to the tensor-core path's.
// ------------------------------------------------------------------------------------------------
constexpr int TAIL_TOKENS = 4;  // tokens per warp step
constexpr int TAIL_LANES = 32 / TAIL_TOKENS;  // lanes per token in the score pass

// Token t's value words for the tail's lane d0 / VPL: packed (t < Tv): w[0] = the lane's code bits
// (VPL * VB of them, from bit 0), w[1] = scale | zero << 16; else the residual's VPL elements (ring
// slot t % ring in static-store mode). Loads only (no convert), so that a step issues all of them
// at once. Nothing is loaded where !valid.
template <typename T, int VB, int D>
__device__ __forceinline__ void load_tail_value_words(const AttnParams& p, const uint8_t* vc, const T* vs, const T* vz,
                                                      const T* vr, int t, bool valid, int Tv, int G, int NG, int d0,
                                                      bool vec, uint32_t (&w)[2]) {
  constexpr int VPL = D / 32;
  static_assert(sizeof(T) == 2 && (VPL == 2 || VPL == 4), "fp16/bf16, head_dim 64 or 128");
  w[0] = w[1] = 0u;
  if (!valid) return;
  if (t < Tv) {
    const int bit0 = d0 * VB;
    const uint8_t* crow = vc + static_cast<int64_t>(t) * (D * VB / 8) + bit0 / 8;
    if constexpr (VPL * VB == 16) {
      w[0] = *reinterpret_cast<const uint16_t*>(crow);
    } else {
      w[0] = static_cast<uint32_t>(*crow) >> (bit0 % 8);
    }
    const int64_t gi = static_cast<int64_t>(t) * NG + d0 / G;
    w[1] = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(vs)[gi]) |
           (static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(vz)[gi]) << 16);
  } else {
    int slot = t - Tv;
    if (p.dyn_end != nullptr) {  // a ring: slot t % ring (computed here: registers are tight)
      slot += Tv % p.ring;
      if (slot >= p.ring) slot -= p.ring;
    }
    const T* row = vr + static_cast<int64_t>(slot) * D + d0;
    if (vec) {  // 16-byte aligned rows: the lane's VPL elements in one load
      if constexpr (VPL == 4) {
        const uint2 u = *reinterpret_cast<const uint2*>(row);
        w[0] = u.x, w[1] = u.y;
      } else {
        w[0] = *reinterpret_cast<const uint32_t*>(row);
      }
    } else {
      const uint16_t* e = reinterpret_cast<const uint16_t*>(row);
#pragma unroll
      for (int i = 0; i < VPL; ++i) w[i / 2] |= static_cast<uint32_t>(e[i]) << (16 * (i % 2));
    }
  }
}

// The VPL float values of load_tail_value_words' words (0 where !valid).
template <typename T, int VB, int VPL>
__device__ __forceinline__ void tail_value_floats(const uint32_t (&w)[2], bool valid, bool packed, float (&v)[VPL]) {
  constexpr uint32_t VMASK = (1u << VB) - 1u;
  auto half_at = [&](int i) { return half_bits_to_f<T>(static_cast<uint16_t>(w[i / 2] >> (16 * (i % 2)))); };
  if (!valid) {
#pragma unroll
    for (int i = 0; i < VPL; ++i) v[i] = 0.f;
  } else if (packed) {
    const float sc = half_at(2), zc = half_at(3);
#pragma unroll
    for (int i = 0; i < VPL; ++i) v[i] = dequant((w[0] >> (i * VB)) & VMASK, sc, zc);
  } else {
#pragma unroll
    for (int i = 0; i < VPL; ++i) v[i] = half_at(i);
  }
}

// NR: the query rows the step computes (the block's nrows rounded up to 1, 4 or ROWS; rows past
// nrows are zero in qf and never read by block_combine). pw keeps its [TAIL_TOKENS][ROWS] layout.
template <typename T, int KB, int VB, int D, int NR>
__device__ __forceinline__ void tail_attn_warp(const AttnParams& p, int b, int h, int Tk, int Tv, const float* qf,
                                               int ta, int tb, int warp, int lane, float* pw, float* red_w,
                                               float* mw_w, float* lw_w) {
  constexpr int PK = 8 / KB, VPL = D / 32, NCH = D / (8 * TAIL_LANES);  // NCH: 8-channel chunks per lane (scores)
  constexpr uint32_t KMASK = (1u << KB) - 1u;
  const int G = p.G, NG = D / G;
  const bool vec = p.res_vec;
  const auto [kc, ks, kz, vc, vs, vz, kr, vr] = head_cache<T>(p, b, h);
  const float sl2 = p.sl2;
  const int tok = lane / TAIL_LANES, qd = lane % TAIL_LANES;  // score pass: token of the step, part of its row

  float m[NR], l[NR], acc[NR][VPL];
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    m[r] = kNegInf;
    l[r] = 0.f;
#pragma unroll
    for (int i = 0; i < VPL; ++i) acc[r][i] = 0.f;
  }
  for (int base = ta + TAIL_TOKENS * warp; base < tb; base += TAIL_TOKENS * WARPS) {
    const int t = base + tok;
    const bool valid = t < tb;
    // the values' raw words first, with the keys' loads: the step waits one memory round trip, not
    // one for the keys and then one per token's value (when the loads sat in their converts'
    // branches after the softmax: ~4 % of the stall samples at GQA batch 8, 32k; this took 1-15 %
    // off the kernel, docs/perf_plan.md "Session 26")
    const int n = min(TAIL_TOKENS, tb - base);
    const int d0 = VPL * lane;
    uint32_t vw[TAIL_TOKENS][2];
#pragma unroll
    for (int j = 0; j < TAIL_TOKENS; ++j) load_tail_value_words<T, VB, D>(p, vc, vs, vz, vr, base + j, j < n, Tv, G, NG, d0, vec, vw[j]);
    float s[NR];
#pragma unroll
    for (int r = 0; r < NR; ++r) s[r] = 0.f;
    if (valid) {
      float k[NCH][8];  // channels 8 * (qd + TAIL_LANES i) + e: the lanes of a token read contiguous bytes
      if (t < Tk) {
        const int shift = (t % PK) * KB;
        const uint8_t* crow = kc + static_cast<int64_t>(t / PK) * D;
        const T* srow = ks + static_cast<int64_t>(t / G) * D;
        const T* zrow = kz + static_cast<int64_t>(t / G) * D;
        uint2 cb[NCH];
        uint4 sc[NCH], zc[NCH];
#pragma unroll
        for (int i = 0; i < NCH; ++i) {
          const int c0 = 8 * (qd + TAIL_LANES * i);
          cb[i] = *reinterpret_cast<const uint2*>(crow + c0);
          sc[i] = *reinterpret_cast<const uint4*>(srow + c0);
          zc[i] = *reinterpret_cast<const uint4*>(zrow + c0);
        }
#pragma unroll
        for (int i = 0; i < NCH; ++i) {
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const uint32_t code = ((e < 4 ? cb[i].x : cb[i].y) >> (8 * (e & 3) + shift)) & KMASK;
            k[i][e] = dequant(code, vec_elem<T>(sc[i], e), vec_elem<T>(zc[i], e));
          }
        }
      } else {
        const T* rrow = kr + static_cast<int64_t>(t - Tk) * D;
        if (vec) {
          uint4 w[NCH];
#pragma unroll
          for (int i = 0; i < NCH; ++i) w[i] = *reinterpret_cast<const uint4*>(rrow + 8 * (qd + TAIL_LANES * i));
#pragma unroll
          for (int i = 0; i < NCH; ++i) {
#pragma unroll
            for (int e = 0; e < 8; ++e) k[i][e] = vec_elem<T>(w[i], e);
          }
        } else {
#pragma unroll
          for (int i = 0; i < NCH; ++i) {
#pragma unroll
            for (int e = 0; e < 8; ++e) k[i][e] = to_f(rrow[8 * (qd + TAIL_LANES * i) + e]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < NCH; ++i) {
        const int c0 = 8 * (qd + TAIL_LANES * i);
#pragma unroll
        for (int r = 0; r < NR; ++r) {
          const float4 q0 = *reinterpret_cast<const float4*>(qf + r * D + c0);
          const float4 q1 = *reinterpret_cast<const float4*>(qf + r * D + c0 + 4);
          s[r] = fmaf(q0.x, k[i][0], fmaf(q0.y, k[i][1], fmaf(q0.z, k[i][2], fmaf(q0.w, k[i][3], s[r]))));
          s[r] = fmaf(q1.x, k[i][4], fmaf(q1.y, k[i][5], fmaf(q1.z, k[i][6], fmaf(q1.w, k[i][7], s[r]))));
        }
      }
    }
    // online softmax over the step's tokens (log2 domain); p to shared memory for the value pass
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      float x = s[r];
#pragma unroll
      for (int o = 1; o < TAIL_LANES; o <<= 1) x += __shfl_xor_sync(kFull, x, o);  // each lane: its token's score
      x = valid && mask_visible(p, b, t) ? x * sl2 : kNegInf;
      float mx = x;
#pragma unroll
      for (int o = TAIL_LANES; o < 32; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, o));
      const float mn = fmaxf(m[r], mx);
      const float mu = mn == kNegInf ? 0.f : mn;
      const float al = fast_exp2(m[r] - mu), pr = fast_exp2(x - mu);
      float ps = pr;  // the lanes with one qd hold one copy of every token's p
#pragma unroll
      for (int o = TAIL_LANES; o < 32; o <<= 1) ps += __shfl_xor_sync(kFull, ps, o);
      l[r] = l[r] * al + ps;
      m[r] = mn;
      if (qd == 0) pw[tok * ROWS + r] = pr;
#pragma unroll
      for (int i = 0; i < VPL; ++i) acc[r][i] *= al;
    }
    __syncwarp();
    // values: lane owns channels [VPL * lane, VPL * lane + VPL), from the words loaded above
    float v[TAIL_TOKENS][VPL];
#pragma unroll
    for (int j = 0; j < TAIL_TOKENS; ++j) tail_value_floats<T, VB, VPL>(vw[j], j < n, base + j < Tv, v[j]);
#pragma unroll
    for (int j = 0; j < TAIL_TOKENS; ++j) {
      float pj[NR];
      if constexpr (NR == 1) {
        pj[0] = pw[j * ROWS];
      } else {
#pragma unroll
        for (int r = 0; r < NR; r += 4) {
          const float4 p4 = *reinterpret_cast<const float4*>(pw + j * ROWS + r);
          pj[r] = p4.x, pj[r + 1] = p4.y, pj[r + 2] = p4.z, pj[r + 3] = p4.w;
        }
      }
#pragma unroll
      for (int r = 0; r < NR; ++r) {
#pragma unroll
        for (int i = 0; i < VPL; ++i) acc[r][i] = fmaf(pj[r], v[j][i], acc[r][i]);
      }
    }
    __syncwarp();  // pw is rewritten by the next step
  }
#pragma unroll
  for (int r = 0; r < NR; ++r) {
#pragma unroll
    for (int i = 0; i < VPL; ++i) red_w[r * D + VPL * lane + i] = acc[r][i];
    if (lane == 0) {
      mw_w[r] = m[r];
      lw_w[r] = l[r];
    }
  }
}

}  // namespace
}  // namespace kivi::cuda
