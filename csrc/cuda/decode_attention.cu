// CUDA fused decode attention over a KIVI cache (flash-decoding):
//   out = softmax(q [Kq ‖ Kres]^T * scale) [Vq ‖ Vres], per (batch, query head), float32 softmax.
// Token t takes its key from the packed part if t < Tk, else k_residual[t - Tk], and its value from
// the packed part if t < Tv, else v_residual[t - Tv]; lengths[b] (optional) masks t >= lengths[b].
// Semantics: kivi_ops/ops/reference.py::decode_attention. Design: docs/cuda_kernels.md.
//
// Kernel 1, grid (splits, B * Hkv * row_chunks), 128 threads: a block takes one KV head, up to 8 of
// its n_rep * M query rows, and one split of the tokens, which has two parts:
//   - bulk: whole 64-token tiles of [0, min(Tk, Tv)) (all-packed), tensor-core fast path
//     (kv_tile.cuh), each warp streaming its own tiles;
//   - tail: a 16-64 token chunk of [bulk_end, T) (packed keys or values past the bulk, the
//     residuals), vector path, 4 tokens per warp step.
// Each warp keeps an online softmax (m, l, acc) in float32; the block merges its warps and writes
// a partial (m, l, acc) to a float32 workspace, or the output itself when there is one split.
// Kernel 2 merges the splits (split_combine.cuh). Shapes the fast path does not cover (float32,
// 8 bits, head_dim other than 64/128, group sizes other than 32/64/128, unaligned buffers) run the
// scalar kernel alone.
#include <torch/library.h>

#include <optional>

#include "kv_tile.cuh"
#include "split_combine.cuh"

namespace kivi::cuda {
namespace {

using namespace tile;

struct AttnParams {
  const void* q;  // [B*Hkv*R, D] (q [B, Hq, M, D] contiguous: the R = n_rep*M rows of a KV head are adjacent)
  void* out;      // same shape, q.dtype
  float* ws_acc;  // [B*Hkv*R, S, D]
  float* ws_ml;   // [B*Hkv*R, S, 2] (m in log2 units, l)
  const void* lengths;
  int len64;
  View kc, ks, kz, vc, vs, vz, kr, vr;
  int B, Hkv, R, n_chunks, D, G, kbits, vbits, Tk, Tv, T;
  int log2G, NG, ks_step;  // from G (kernel parameters, not worked out per tile): NG = D / G groups per
                           // value row; ks_step = (WARPS * TT / G) * D * 2 key scale bytes per warp tile step
  float sl2;  // softmax scale * log2(e)
  int n_splits, n_bulk, n_tail, tps, bulk_tiles, tail_start, tail_chunk;
  // fast kernel: splits [0, n_tail) are tail-only blocks, then the bulk splits; else split s takes both
  int tail_apart;
  int light, n_light;  // merged tail: bulk splits [0, n_light), which also run a tail chunk, take tps - light tiles
  int res_vec;  // residual rows 16-byte aligned (vector loads in the tail)
  // Static-store mode (kivi::static_kv_attention's decode step; null/0 otherwise): the token count
  // `end` is a device value, so the split point is too: keys quantized below floor(end/ring)*ring,
  // values below max(end - ring, 0); the residuals are rings (position t in slot t % ring). Tk, Tv,
  // T and bulk_tiles then hold the stores' capacity and each block finds its range on the device.
  const int64_t* dyn_end;
  int ring;
  // Optional key mask as bits (token t of sequence b visible iff bit t % 32 of word
  // b * mask_bstride + t / 32 is set); mask_bstride 0 broadcasts one row over the batch.
  const uint32_t* mask_bits;
  int mask_bstride;
};

__device__ __forceinline__ bool mask_visible(const AttnParams& p, int b, int t) {
  if (p.mask_bits == nullptr) return true;
  return (p.mask_bits[static_cast<int64_t>(b) * p.mask_bstride + (t >> 5)] >> (t & 31)) & 1u;
}

__device__ __forceinline__ int seq_len(const AttnParams& p, int b) {
  if (p.lengths == nullptr) return p.T;
  const int64_t l = p.len64 ? static_cast<const int64_t*>(p.lengths)[b] : static_cast<const int*>(p.lengths)[b];
  return static_cast<int>(l < 0 ? 0 : (l > p.T ? p.T : l));
}

// ------------------------------------------------------------------------------------------------
// Scalar path: one token per warp step, lanes over channels (d = lane + 32 j), all rows.
// ------------------------------------------------------------------------------------------------
template <typename T, int DJ>
__device__ __forceinline__ void generic_attn_warp(const AttnParams& p, int b, int h, const T* qh, int nrows, int ta,
                                                  int tb, int warp, int lane, float* red_w, float* mw_w, float* lw_w) {
  const int D = p.D, G = p.G, Tk = p.Tk, Tv = p.Tv;
  const uint8_t* kc = at_head<uint8_t>(p.kc, b, h);
  const T* ks = at_head<T>(p.ks, b, h);
  const T* kz = at_head<T>(p.kz, b, h);
  const uint8_t* vc = at_head<uint8_t>(p.vc, b, h);
  const T* vs = at_head<T>(p.vs, b, h);
  const T* vz = at_head<T>(p.vz, b, h);
  const T* kr = at_head<T>(p.kr, b, h);
  const T* vr = at_head<T>(p.vr, b, h);
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
    float kv[DJ], vv[DJ];
    if (t < Tk) {
#pragma unroll
      for (int j = 0; j < DJ; ++j) {
        const int d = lane + 32 * j;
        kv[j] = d < D ? key_elem<T>(kc, ks, kz, t, d, D, p.kbits, G) : 0.f;
      }
    } else {
      const T* row = kr + static_cast<int64_t>(t - Tk) * D;
#pragma unroll
      for (int j = 0; j < DJ; ++j) {
        const int d = lane + 32 * j;
        kv[j] = d < D ? to_f(row[d]) : 0.f;
      }
    }
    if (t < Tv) {
#pragma unroll
      for (int j = 0; j < DJ; ++j) {
        const int d = lane + 32 * j;
        vv[j] = d < D ? value_elem<T>(vc, vs, vz, t, d, D, p.vbits, G) : 0.f;
      }
    } else {
      const T* row = vr + static_cast<int64_t>(t - Tv) * D;
#pragma unroll
      for (int j = 0; j < DJ; ++j) {
        const int d = lane + 32 * j;
        vv[j] = d < D ? to_f(row[d]) : 0.f;
      }
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
  const uint8_t* kc = at_head<uint8_t>(p.kc, b, h);
  const T* ks = at_head<T>(p.ks, b, h);
  const T* kz = at_head<T>(p.kz, b, h);
  const uint8_t* vc = at_head<uint8_t>(p.vc, b, h);
  const T* vs = at_head<T>(p.vs, b, h);
  const T* vz = at_head<T>(p.vz, b, h);
  const T* kr = at_head<T>(p.kr, b, h);
  const T* vr = at_head<T>(p.vr, b, h);
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

// ------------------------------------------------------------------------------------------------
// Fast path: whole tiles of [tile_beg, tile_end) * TT, all packed.
// ------------------------------------------------------------------------------------------------
// Shared memory an SM of the H100/H200 gives its blocks (228 KB), and what each block reserves.
constexpr int kSmemPerSM = 233472, kSmemPerBlockReserved = 1024;

// Blocks of the fused kernel that fit one SM's shared memory with an NST-stage ring.
template <int KB, int VB, int D, int NST>
constexpr int attn_blocks_by_smem() {
  return kSmemPerSM / (Geo<KB, VB, D, true, true, NST>::BLOCK_BYTES + kSmemPerBlockReserved);
}

// Whether a one-stage ring lets a third block fit per SM where two stages do not: 4-bit keys or
// values at head_dim 128 (105.7 KB per block at 4/4 bits with two stages, 62.6 KB with one).
// Those shapes get both kernels; plan_and_launch picks one per call (ring_stages_for).
template <int KB, int VB, int D>
constexpr bool has_one_stage_ring() {
  return attn_blocks_by_smem<KB, VB, D, 2>() < 3 && attn_blocks_by_smem<KB, VB, D, 1>() >= 3;
}

template <int KB, int VB, int D, int NST>
using AttnGeo = Geo<KB, VB, D, true, true, NST>;

// Benchmark-only build variants that remove parts of the bulk tile loop, to measure what each part
// costs at a given shape (scripts/gpu_check.sh ablate; docs/perf_plan.md, "Session 11"). Any value
// but 0 gives WRONG results; the library is never built with one.
//   0: everything (the default);
//   1: no value phase (no transpose of the value scales/zeros, no P write, no value mma);
//   2: no compute: the ring's loads and waits only;
//   3: no bulk tiles: launch, prologue (q tables), tail chunk, merges and split combine only;
//   4: as 3, without the tail chunk either;
//   5: an empty split kernel (it returns at once), then the split combine;
//   6: compute only: a warp's first NST tiles are loaded, and every later tile computes on them again
//      (no global traffic in the loop: what the unpack, mma and softmax cost alone).
#ifndef KIVI_ATTN_ABLATE
#define KIVI_ATTN_ABLATE 0
#endif
constexpr int kAblate = KIVI_ATTN_ABLATE;
static_assert(kAblate >= 0 && kAblate <= 6, "KIVI_ATTN_ABLATE is 0 to 6");
constexpr bool kAblateKeepsBulk = kAblate < 3 || kAblate == 6;  // the bulk tile loop runs
constexpr bool kAblateKeepsTail = kAblate < 4 || kAblate == 6;  // the tail chunks run

// Whether the kernels for blocks of at most 4 query rows (value_accum_narrow: 2-bit values through
// ldmatrix) exist; plan_and_launch takes them where every block has that few (n_rep * M <= 4).
// KIVI_VALUE_NARROW=0 at build time: the byte loads for every row count (A/B).
#ifndef KIVI_VALUE_NARROW
#define KIVI_VALUE_NARROW 1
#endif
// KIVI_LAZY_MAX=0 at build time: every tile reduces its max across the lanes (A/B).
#ifndef KIVI_LAZY_MAX
#define KIVI_LAZY_MAX 1
#endif
constexpr bool kLazyMax = KIVI_LAZY_MAX != 0;

template <int VB>
constexpr bool has_narrow_values() {
  return VB == 2 && KIVI_VALUE_NARROW != 0;
}

// Rescales mma accumulators by their query row's factor: x[i][0], x[i][2] are row 2 tid's (a0),
// x[i][1], x[i][3] row 2 tid + 1's (a1).
template <int N>
__device__ __forceinline__ void scale_acc_rows(float (&x)[N][4], float a0, float a1) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    x[i][0] *= a0;
    x[i][1] *= a1;
    x[i][2] *= a0;
    x[i][3] *= a1;
  }
}

// Writes each warp's (acc, m, l) to red[warp * ROWS * D ...], mw[warp * ROWS ...], lw[warp * ROWS ...]
// (shared memory that aliases the staging ring: valid after the function's last barrier).
// PAIRED: blocks of at most 4 query rows (p.R <= 4: MHA, GQA 4:1, M <= 4). The key mma carries
// Q'hi and Q'lo of row r in columns 2r and 2r + 1 (key_scores' PAIRED: half the key mmas), so lane
// tid holds row tid's scores and runs that row's online softmax alone: one row per lane, against
// two (8-row blocks) or a repeat of rows 0-3 (the narrow value path's columns 4-7) before. NARROW
// (value_accum_narrow, 2-bit values) is only built with it.
template <typename T, int KB, int VB, int D, int NST, bool NARROW, bool PAIRED>
__device__ __forceinline__ void fast_attn(const AttnParams& p, unsigned char* smem, int b, int h, const T* qh,
                                          int nrows, int tile_beg, int tile_end, int L, int warp, int lane, float* red,
                                          float* mw, float* lw) {
  using GEO = AttnGeo<KB, VB, D, NST>;
  static_assert(PAIRED || !NARROW, "the narrow value path rescales by the paired softmax's rows");
  constexpr int NVM = D / 16, NCB = D / 32, NMT = GEO::NMT;
  constexpr int NR = PAIRED ? 1 : 2;  // query rows per lane: row r's scores are S[mt][r] and S[mt][r + 2]
  const int gid = lane >> 2, tid = lane & 3;
  const int NG = p.NG, log2G = p.log2G;  // G = 2^log2G
  const uint8_t* kc = at_head<uint8_t>(p.kc, b, h);
  const T* ks = at_head<T>(p.ks, b, h);
  const T* kz = at_head<T>(p.kz, b, h);
  const uint8_t* vc = at_head<uint8_t>(p.vc, b, h);
  const unsigned char* vs = reinterpret_cast<const unsigned char*>(at_head<T>(p.vs, b, h));
  const unsigned char* vz = reinterpret_cast<const unsigned char*>(at_head<T>(p.vz, b, h));
  uint32_t* qperm = reinterpret_cast<uint32_t*>(smem + GEO::OFF_QP);
  float* qz = reinterpret_cast<float*>(smem + GEO::OFF_QZ);
  unsigned char* wb = smem + GEO::OFF_W + warp * GEO::WARP_BYTES;
  uint32_t* sps = reinterpret_cast<uint32_t*>(wb + GEO::OFF_SPS);
  uint32_t* spz = reinterpret_cast<uint32_t*>(wb + GEO::OFF_SPZ);
  uint32_t* pb = reinterpret_cast<uint32_t*>(wb + GEO::OFF_PB);

  const int ntiles = tile_end > tile_beg ? tile_end - tile_beg : 0;
  int gA = 0, ng = 0;
  if (ntiles > 0) {
    gA = (tile_beg * TT) >> log2G;
    ng = ((tile_end * TT - 1) >> log2G) + 1 - gA;
  }

  float m[NR], l[NR];
#pragma unroll
  for (int r = 0; r < NR; ++r) m[r] = kNegInf, l[r] = 0.f;
  float acc[NVM][4], zacc[NCB][4];
#pragma unroll
  for (int i = 0; i < NVM; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
  for (int i = 0; i < NCB; ++i) zacc[i][0] = zacc[i][1] = zacc[i][2] = zacc[i][3] = 0.f;
  // Key B operands: column gid is query row gid, or (PAIRED) column 2r takes (q_r, 0) as its (qa, qb)
  // and column 2r + 1 (q_r, q_r); row 4 is zero in qperm (fill_qperm: rows past nrows <= 4).
  const int zrow = PAIRED ? tid : 2 * tid;  // the lane's first query row
  const uint32_t* qmine_a = qperm + ((PAIRED ? gid >> 1 : gid) * 4 + tid) * GEO::QPS;
  const uint32_t* qmine_b = PAIRED ? qperm + (((gid & 1) ? gid >> 1 : 4) * 4 + tid) * GEO::QPS : nullptr;
  if constexpr (PAIRED && !NARROW) {  // value_accum reads P rows 0-7 (columns gid): rows 4-7 stay 0
    for (int i = lane; i < (ROWS - 4) * PS; i += 32) pb[4 * PS + i] = 0u;
  }
  const int nmy = kAblateKeepsBulk && warp < ntiles ? (ntiles - warp + WARPS - 1) / WARPS : 0;
  const float sl2 = p.sl2;

  // The ring. Two stages: tile it + 1 (keys and values, one cp.async group) loads while the warp
  // computes tile it. One stage, split-phase: keys and values are separate groups; tile it + 1's
  // keys load into the key region once tile it's scores are in registers (over its softmax and
  // values), its values once tile it's values are accumulated (over tile it + 1's scores). Either
  // way each wait is for the older of two groups in flight: cp_async_wait<1>.
  auto tile_t0 = [&](int it) { return (tile_beg + warp + WARPS * it) * TT; };
  // stage_k(it) / stage_v(it) are called for it = 0, 1, ... in turn (each tile once): the copies advance
  WarpTileCopies<GEO, D> copies(kc, reinterpret_cast<const unsigned char*>(ks), vc, vs, vz, tile_t0(0), log2G, NG, p.ks_step, lane);
  auto stage_k = [&](int it) {
    if (kAblate != 6 || it < NST) copies.keys(wb + (it % NST) * GEO::STAGE_BYTES, lane);
  };
  auto stage_v = [&](int it) {
    if (kAblate != 6 || it < NST) copies.values(wb + (it % NST) * GEO::STAGE_BYTES, lane);
  };
  // every tile's scale/zero rows start this far past a 16-byte boundary (t0 * NG * 2 is a multiple of 16)
  const int soff = static_cast<int>(reinterpret_cast<uintptr_t>(vs) & 15);
  const int zoff = static_cast<int>(reinterpret_cast<uintptr_t>(vz) & 15);
  if (nmy > 0) stage_k(0);
  if constexpr (NST == 1) cp_async_commit();
  if (nmy > 0) stage_v(0);
  cp_async_commit();
  // the query tables after the first tiles are requested: their loads and the tiles' overlap. (Their
  // rows requested into L2 first, with both stages of a two-stage ring filled before the tables, was
  // up to 8 % slower, on 18 of 24 quick-grid rows: docs/perf_plan.md, "Session 26".)
  fill_qperm<T, D, GEO::QPS>(qperm, qh, nrows);
  qz_prologue<T, D>(qz, kz, qh, nrows, gA, ng, warp, lane, sl2);
  __syncthreads();
  for (int it = 0; it < nmy; ++it) {
    if constexpr (NST == 2) {
      if (it + 1 < nmy) {
        stage_k(it + 1);
        stage_v(it + 1);
      }
      cp_async_commit();
    }
    cp_async_wait<1>();  // tile it, or (one stage) its keys
    __syncwarp();
    if constexpr (kAblate == 2) {  // loads only: keep the one-stage ring's group order
      if constexpr (NST == 1) {
        if (it + 1 < nmy) stage_k(it + 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncwarp();
        if (it + 1 < nmy) stage_v(it + 1);
        cp_async_commit();
      }
      continue;
    }
    const unsigned char* st = wb + (it % NST) * GEO::STAGE_BYTES;
    const int t0 = tile_t0(it);
    if constexpr (NST == 2 && kAblate != 1) transpose_vsz<GEO, NARROW>(st, sps, spz, soff, zoff, NG, TT, lane);

    float S[NMT][4];
    key_scores<T, GEO, KB, D, PAIRED>(st, t0, log2G, qmine_a, qz, gA, sl2, S, lane, zrow, qmine_b);
    if constexpr (NST == 1) {
      __syncwarp();  // every lane's reads of the key region are done: it takes tile it + 1's keys
      if (it + 1 < nmy) stage_k(it + 1);
      cp_async_commit();
    }

    // online softmax (log2 domain: key_scores scaled by sl2) of the lane's rows: zrow + r, r < NR (c = r, r + 2)
    if (t0 + TT > L) {  // rare (the tile holding lengths[b]): mask tokens >= L
#pragma unroll
      for (int mt = 0; mt < NMT; ++mt) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (t0 + score_token<GEO>(mt, c, gid) >= L) S[mt][c] = kNegInf;
        }
      }
    }
    if (p.mask_bits != nullptr) {  // a key mask (padded batches): one 64-bit word per tile, all lanes alike
      static_assert(TT == 64, "the tile's mask is two 32-bit words");
      const uint32_t* mword = p.mask_bits + static_cast<int64_t>(b) * p.mask_bstride + (t0 >> 5);
      const uint32_t w0 = mword[0], w1 = mword[1];
      if ((w0 & w1) != 0xffffffffu) {
#pragma unroll
        for (int mt = 0; mt < NMT; ++mt) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int tk = score_token<GEO>(mt, c, gid);
            if ((((tk < 32 ? w0 : w1) >> (tk & 31)) & 1u) == 0u) S[mt][c] = kNegInf;
          }
        }
      }
    }
    float mx[NR];
    bool rises = false;
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      mx[r] = fmaxf(S[0][r], S[0][r + 2]);
#pragma unroll
      for (int mt = 1; mt < NMT; ++mt) mx[r] = fmaxf(mx[r], fmaxf(S[mt][r], S[mt][r + 2]));
      rises = rises || mx[r] > m[r];
    }
    // The new running max is max(m, the tile's max). Where no lane's scores exceed m (a vote), that
    // is m itself: the lanes' max reduction, the rescale factors and the rescale are skipped, with
    // results identical to taking them. Once the first tiles have set the max that is most tiles.
    if (!kLazyMax || __any_sync(kFull, rises)) {
      float al[NR];
      bool rescale = false;
#pragma unroll
      for (int r = 0; r < NR; ++r) {
#pragma unroll
        for (int o = 4; o < 32; o <<= 1) mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFull, mx[r], o));
        const float mn = fmaxf(m[r], mx[r]);
        al[r] = fast_exp2(m[r] - (mn == kNegInf ? 0.f : mn));
        m[r] = mn;
        l[r] *= al[r];
        rescale = rescale || al[r] != 1.f;
      }
      if (__any_sync(kFull, rescale)) {
        // a lane's value columns 2 tid, 2 tid + 1 are query rows 2 tid, 2 tid + 1 (value_accum) or those
        // mod 4 (value_accum_narrow). PAIRED: their factors come from the lanes tid that ran those
        // rows (columns of rows past 3 are never read: their factor is any finite one).
        const float a0 = PAIRED ? __shfl_sync(kFull, al[0], (lane & ~3) | ((2 * tid) & 3)) : al[0];
        const float a1 = PAIRED ? __shfl_sync(kFull, al[0], (lane & ~3) | ((2 * tid + 1) & 3)) : al[NR - 1];
        scale_acc_rows(acc, a0, a1);
        scale_acc_rows(zacc, a0, a1);
      }
    }
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      const float mu = m[r] == kNegInf ? 0.f : m[r];
      float ls = 0.f;
#pragma unroll
      for (int mt = 0; mt < NMT; ++mt) {
        S[mt][r] = fast_exp2(S[mt][r] - mu);
        S[mt][r + 2] = fast_exp2(S[mt][r + 2] - mu);
        ls += S[mt][r] + S[mt][r + 2];
      }
      l[r] += ls;
    }
    if constexpr (NST == 1) {
      cp_async_wait<1>();  // the values of tile it
      __syncwarp();
      if constexpr (kAblate != 1) transpose_vsz<GEO, NARROW>(st, sps, spz, soff, zoff, NG, TT, lane);
    }
    if constexpr (kAblate != 1) {
      write_pairs<T, GEO, PAIRED>(pb, S, lane);
      __syncwarp();
      if constexpr (NARROW) {
        value_accum_narrow<T, GEO, D>(st, sps, spz, pb, acc, zacc, lane);
      } else {
        value_accum<T, GEO, VB, D>(st, sps, spz, pb, acc, zacc, lane);
      }
    }
    __syncwarp();
    if constexpr (NST == 1) {  // the value region is free: tile it + 1's values
      if (it + 1 < nmy) stage_v(it + 1);
      cp_async_commit();
    }
  }
  cp_async_wait<0>();
#pragma unroll
  for (int r = 0; r < NR; ++r) {
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) l[r] += __shfl_xor_sync(kFull, l[r], o);
  }
  __syncthreads();  // the combine buffers alias every warp's ring
  if constexpr (NARROW) {
    write_warp_acc_narrow<T, D>(red, warp, acc, zacc, lane);
  } else {
    write_warp_acc<T, GEO, D>(red, warp, acc, zacc, lane);
  }
  if (gid == 0) {  // PAIRED: rows 0-3 only (block_combine reads rows < nrows <= 4)
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      mw[warp * ROWS + zrow + r] = m[r];
      lw[warp * ROWS + zrow + r] = l[r];
    }
  }
}

// Merge the block's partial results [w0, w1) (a warp's online softmax each: red/mw/lw in shared
// memory, part w at red[w * ROWS * D], mw[w * ROWS], lw[w * ROWS]) into the split's partial or the
// output. No part: m = -inf, l = 0, acc = 0 (the output 0/0 = NaN, like the reference's empty softmax).
// The per-row weights 2^(m_w - M) are computed once (a thread per row, in place of mw), so the
// element loop is independent loads and fmas; D is a compile-time constant where the caller has one
// (the element loop's division by D, with the weights recomputed per element, took ~12 % of the
// batch-1 GQA 32k kernel's stall samples).
template <typename T>
__device__ __forceinline__ void block_combine(const AttnParams& p, const float* red, float* mw, const float* lw,
                                              int w0, int w1, int bh, int r0, int nrows, int split, int D) {
  __shared__ float row_m[ROWS], row_l[ROWS];
  if (threadIdx.x < nrows) {
    const int r = threadIdx.x;
    float M = kNegInf;
    for (int w = w0; w < w1; ++w) M = fmaxf(M, mw[w * ROWS + r]);
    const float mu = M == kNegInf ? 0.f : M;
    float ls = 0.f;
    for (int w = w0; w < w1; ++w) {
      const float f = fast_exp2(mw[w * ROWS + r] - mu);
      ls += f * lw[w * ROWS + r];
      mw[w * ROWS + r] = f;
    }
    row_m[r] = M;
    row_l[r] = ls;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < nrows * D; e += THREADS) {
    const int r = e / D, d = e - r * D;
    float a = 0.f;
    for (int w = w0; w < w1; ++w) a += mw[w * ROWS + r] * red[(w * ROWS + r) * D + d];
    const int64_t row = static_cast<int64_t>(bh) * p.R + r0 + r;
    if (p.n_splits == 1) {
      static_cast<T*>(p.out)[row * D + d] = from_f<T>(a / row_l[r]);  // 0/0 = NaN: no valid token, like the reference
    } else {
      p.ws_acc[(row * p.n_splits + split) * D + d] = a;
      if (d == 0) {
        p.ws_ml[(row * p.n_splits + split) * 2] = row_m[r];
        p.ws_ml[(row * p.n_splits + split) * 2 + 1] = row_l[r];
      }
    }
  }
}

struct BlockCoords {
  int split, bh, b, h, r0, nrows, L;
  int Tk, Tv, bulk_tiles, tps, tail_start;  // the split geometry: p's, or found from p.dyn_end
};

__device__ __forceinline__ BlockCoords block_coords(const AttnParams& p) {
  BlockCoords c;
  c.split = blockIdx.x;
  const int y = blockIdx.y;
  const int rc = y % p.n_chunks;
  c.bh = y / p.n_chunks;
  c.b = c.bh / p.Hkv;
  c.h = c.bh % p.Hkv;
  c.r0 = rc * ROWS;
  c.nrows = min(ROWS, p.R - c.r0);
  if (p.dyn_end == nullptr) {
    c.L = seq_len(p, c.b);
    c.Tk = p.Tk;
    c.Tv = p.Tv;
    c.bulk_tiles = p.bulk_tiles;
    c.tps = p.tps;
    c.tail_start = p.tail_start;
  } else {  // the host planned for the capacity: n_bulk splits share the bulk that exists now
    const int64_t e = *p.dyn_end;
    c.L = static_cast<int>(e < 0 ? 0 : (e > p.T ? p.T : e));
    c.Tk = c.L / p.ring * p.ring;
    c.Tv = max(c.L - p.ring, 0);
    c.bulk_tiles = min(min(c.Tk, c.Tv) / TT, p.bulk_tiles);
    c.tps = p.n_bulk > 0 ? (c.bulk_tiles + p.n_bulk - 1) / p.n_bulk : 0;
    c.tail_start = c.bulk_tiles * TT;
  }
  return c;
}

// Blocks per SM to keep: the register cap that follows (168 registers at 3 blocks) stops the
// registers from lowering the occupancy the shared memory allows (AttnGeo::BLOCK_BYTES: 3 blocks,
// or 2 at 4 bits with a two-stage ring). Head_dim 64 would allow 4 but then the tail spills: 3.
// Four blocks of the one-stage ring at head_dim 128 (128 registers, 88-104 bytes spilled) measured
// 0-8 % slower than three of the two-stage ring at 2 bits from 32k (H200, 53e232c: more warps do
// not pay for the spills).
template <int KB, int VB, int D, int NST>
constexpr int fused_min_blocks() {
  constexpr int by_smem = attn_blocks_by_smem<KB, VB, D, NST>();
  return by_smem < 3 ? by_smem : 3;
}

// A block does bulk split bs (tiles [bs * tps, +tps), tensor cores; a light split, bs < n_light,
// takes tps - light and moves the later splits' starts back: plan_light_splits) and/or tail chunk ts
// (tokens [tail_start + ts * tail_chunk, +tail_chunk), vector path, a step or two per warp), then
// merges them.
// Tail apart (p.tail_apart): the first n_tail blocks take the tail chunks, the rest the bulk splits;
// the tail blocks, short, run beside the bulk when the grid has room for both in one round. Else
// split s takes bulk split s and tail chunk s: no tail-only block holds a slot that a bulk block then
// waits for (GQA batch 8, 32k: 896 blocks for 396 slots before, 384 now).
template <typename T, int KB, int VB, int D, int NST, bool NARROW, bool PAIRED>
__global__ void __launch_bounds__(THREADS, (fused_min_blocks<KB, VB, D, NST>())) attn_fused_kernel(const __grid_constant__ AttnParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int PARTS = 2 * WARPS;  // partial results: the bulk's warps, then the tail's
  pdl_launch_dependents();  // the combine may launch now: it waits for this grid's end (see plan_and_launch)
  if constexpr (kAblate == 5) return;
  const BlockCoords c = block_coords(p);
  const int warp = __shfl_sync(0xffffffffu, threadIdx.x >> 5, 0), lane = threadIdx.x & 31;
  const T* qh = static_cast<const T*>(p.q) + (static_cast<int64_t>(c.bh) * p.R + c.r0) * D;
  float* red = reinterpret_cast<float*>(smem);
  float* mw = red + PARTS * ROWS * D;
  float* lw = mw + PARTS * ROWS;
  float* qf = lw + PARTS * ROWS;  // tail: [ROWS, D] float32 query rows, zero past nrows
  float* pw = qf + ROWS * D;      // tail: per warp [TAIL_TOKENS, ROWS] probabilities
  static_assert((PARTS * ROWS * D + 2 * PARTS * ROWS + ROWS * D + WARPS * TAIL_TOKENS * ROWS) * 4 <=
                    AttnGeo<KB, VB, D, NST>::BLOCK_BYTES, "combine and tail buffers exceed the block's shared memory");
  const int bsplit = p.tail_apart ? c.split - p.n_tail : c.split;              // < 0: no bulk
  const int tsplit = p.tail_apart && c.split >= p.n_tail ? p.n_splits : c.split;  // >= n_tail: no tail
  const int tb = bsplit * c.tps - min(bsplit, p.n_light) * p.light;  // light = 0 but in a merged tail plan
  const int te = min(min(tb + c.tps - (bsplit < p.n_light ? p.light : 0), c.bulk_tiles), (c.L + TT - 1) / TT);
  const int ta = c.tail_start + tsplit * p.tail_chunk;
  const int tz = min(min(ta + p.tail_chunk, p.T), c.L);
  const bool bulk = bsplit >= 0 && tb < te, tail = kAblateKeepsTail && tsplit < p.n_tail && ta < tz;  // block-uniform
  // fast_attn's last barrier ends every use of the staging ring, which qf and pw then reuse
  if (bulk) fast_attn<T, KB, VB, D, NST, NARROW, PAIRED>(p, smem, c.b, c.h, qh, c.nrows, tb, te, c.L, warp, lane, red, mw, lw);
  if (tail) {
    for (int e = threadIdx.x; e < ROWS * D; e += THREADS) {
      const int r = e / D;
      qf[e] = r < c.nrows ? to_f(qh[e]) : 0.f;
    }
    __syncthreads();
    auto run_tail = [&](auto NR) {
      tail_attn_warp<T, KB, VB, D, decltype(NR)::value>(p, c.b, c.h, c.Tk, c.Tv, qf, ta, tz, warp, lane,
                                                        pw + warp * TAIL_TOKENS * ROWS, red + (WARPS + warp) * ROWS * D,
                                                        mw + (WARPS + warp) * ROWS, lw + (WARPS + warp) * ROWS);
    };
    // Only the block's query rows, in decode's common counts: 1 (MHA), up to 4 (GQA 4:1); every row
    // otherwise (1.2-11 % at batch 1, 4k; the A/B at c4292da, docs/perf_plan.md "Session 18"). The
    // one-stage kernels too since session 21's loop left them room under their 168-register cap
    // (1.6-3 % at 4/4 bits from 32k, same-call A/B).
    // (PAIRED kernels only ever hold at most 4 rows: the 8-row copy is not built)
    if (c.nrows == 1) {
      run_tail(std::integral_constant<int, 1>{});
    } else if (PAIRED || c.nrows <= 4) {
      run_tail(std::integral_constant<int, 4>{});
    } else {
      run_tail(std::integral_constant<int, ROWS>{});
    }
  }
  __syncthreads();
  block_combine<T>(p, red, mw, lw, bulk ? 0 : WARPS, tail ? PARTS : WARPS, c.bh, c.r0, c.nrows, c.split, D);
}

template <typename T, int DJ>
__global__ void __launch_bounds__(THREADS) attn_generic_kernel(const __grid_constant__ AttnParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  pdl_launch_dependents();
  const BlockCoords c = block_coords(p);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* qh = static_cast<const T*>(p.q) + (static_cast<int64_t>(c.bh) * p.R + c.r0) * p.D;
  float* red = reinterpret_cast<float*>(smem);
  float* mw = red + WARPS * ROWS * p.D;
  float* lw = mw + WARPS * ROWS;
  const int ta = p.tail_start + c.split * p.tail_chunk;
  const int tb = min(min(ta + p.tail_chunk, p.T), c.L);
  generic_attn_warp<T, DJ>(p, c.b, c.h, qh, c.nrows, ta, tb, warp, lane, red + warp * ROWS * p.D, mw + warp * ROWS,
                           lw + warp * ROWS);
  __syncthreads();
  block_combine<T>(p, red, mw, lw, 0, WARPS, c.bh, c.r0, c.nrows, c.split, p.D);
}

// ------------------------------------------------------------------------------------------------
// Host
// ------------------------------------------------------------------------------------------------

template <typename F>
void dispatch_fast(at::ScalarType st, int64_t kb, int64_t vb, int64_t D, F&& f) {
  dispatch_tc_dtype(st, [&](auto tT) {
    dispatch_tc_bits(kb, [&](auto kB) {
      dispatch_tc_bits(vb, [&](auto vB) { dispatch_tc_dim(D, [&](auto dD) { f(tT, kB, vB, dD); }); });
    });
  });
}

// A block's longest warp in half tiles: its bulk tiles dealt round the warps, then a tail step,
// which costs ~1.5 tiles per warp (measured: GQA batch 1, 4k took 13 us apart and 18 us merged).
inline int warp_half_tiles(int tiles, bool tail) { return 2 * ceil_div(tiles, WARPS) + (tail ? 3 : 0); }

// Light splits. With the tail merged into the bulk splits, a split that also runs a tail chunk ends
// a tail step after its bulk and sets the time of a one-round grid. Where it shortens the longest
// warp, those n_tail splits take `light` (1 or 2 tiles per warp) fewer bulk tiles and the others
// more. Only for a merged plan of one round (nbh x n_bulk blocks within the target slots) whose bulk
// is known on the host. A tail-apart plan stays: replacing it measured 2-5 % slower (GQA batch 1,
// 32k), the merged plans it improves 2-8 % faster (benchmarks/results/2026-11-30-h200-light-splits).
// KIVI_ATTN_LIGHT=0 turns it off; 1 or 2 forces that many tiles per warp (A/B and test knob).
void plan_light_splits(AttnParams& p, int64_t nbh, int target, int cap) {
  const char* knob_env = std::getenv("KIVI_ATTN_LIGHT");
  const int knob = knob_env != nullptr ? std::atoi(knob_env) : -1;
  const int nb = p.n_bulk;
  if (knob == 0 || p.tail_apart || p.n_tail == 0 || p.n_tail >= nb || nbh * nb > target) return;
  int best = warp_half_tiles(p.tps, true), light = 0, tps = 0;
  for (int k = 1; k <= 2; ++k) {
    if (knob > 0 && k != knob) continue;
    const int l = k * WARPS, t = ceil_div(p.bulk_tiles + p.n_tail * l, nb);
    if (t - l < 1 || t > cap) continue;
    const int cost = std::max(warp_half_tiles(t, false), warp_half_tiles(t - l, true));
    if (knob > 0 || cost < best) best = cost, light = l, tps = t;
  }
  if (light == 0) return;
  int n = nb;  // drop splits that would get no tile
  while (n > p.n_tail + 1 && (n - 1) * tps - p.n_tail * light >= p.bulk_tiles) --n;
  p.light = light;
  p.n_light = p.n_tail;
  p.tps = tps;
  p.n_bulk = p.n_splits = n;
}

// The shapes and pointers of one call (q contiguous [B, Hq, M, D]; Tk, Tv, T in tokens).
AttnParams make_params(const at::Tensor& q, at::Tensor& out, const at::Tensor& kc, const at::Tensor& ks,
                       const at::Tensor& kz, const at::Tensor& vc, const at::Tensor& vs, const at::Tensor& vz,
                       const at::Tensor& kr, const at::Tensor& vr, int64_t k_bits, int64_t v_bits, int64_t G,
                       double softmax_scale, int64_t Tk, int64_t Tv, int64_t T) {
  const int64_t B = q.size(0), Hq = q.size(1), M = q.size(2), D = q.size(3), Hkv = kc.size(1);
  const int64_t R = Hq / Hkv * M;
  AttnParams p{};
  p.q = q.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.kc = view_of(kc);
  p.ks = view_of(ks);
  p.kz = view_of(kz);
  p.vc = view_of(vc);
  p.vs = view_of(vs);
  p.vz = view_of(vz);
  p.kr = view_of(kr);
  p.vr = view_of(vr);
  p.B = static_cast<int>(B);
  p.Hkv = static_cast<int>(Hkv);
  p.R = static_cast<int>(R);
  p.n_chunks = ceil_div(R, ROWS);
  p.D = static_cast<int>(D);
  p.G = static_cast<int>(G);
  p.log2G = ilog2_exact(G);  // the fast path's G (32, 64, 128); -1 (unused) for others
  p.NG = static_cast<int>(D / G);
  p.ks_step = static_cast<int>(WARPS * TT / G * D * 2);
  p.kbits = static_cast<int>(k_bits);
  p.vbits = static_cast<int>(v_bits);
  p.Tk = static_cast<int>(Tk);
  p.Tv = static_cast<int>(Tv);
  p.T = static_cast<int>(T);
  p.sl2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  KIVI_CHECK(B * Hkv * p.n_chunks <= 65535, "kivi: batch * KV heads * ceil(query rows / 8) = ",
              B * Hkv * p.n_chunks, " exceeds 65535");
  return p;
}

// Whether the tensor-core kernel takes these dtypes, bit widths, head_dim, group and alignments.
bool fast_path_ok(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& ks, const at::Tensor& kz,
                  const at::Tensor& vc, int64_t k_bits, int64_t v_bits, int64_t G) {
  const auto dtype = q.scalar_type();
  const int64_t D = q.size(3);
  return (dtype == at::kHalf || dtype == at::kBFloat16) && (k_bits == 2 || k_bits == 4) &&
         (v_bits == 2 || v_bits == 4) && (D == 64 || D == 128) && (G == 32 || G == 64 || G == 128) &&
         aligned_view(kc, 1) && aligned_view(ks, 2) && aligned_view(kz, 2) && aligned_view(vc, 1) &&
         aligned16(q.const_data_ptr());
}

// Ring stages for a call whose heads have bulk_tiles tiles, where the shape has both kernels. One
// stage (three blocks per SM) from 256 tiles (16k tokens) per head. Measured on the H200 at 4/4 bits
// (benchmarks/results/2026-11-29-h200-2c92f7b): batch 8 at 32k and 128k gains 2.5-7.4 %, batch 1
// at 128k 0-6 %, GQA batch 1 at 32k 4 %, and MHA batch 1 at 32k loses 3 %. At 4k one stage is
// 4-10 % slower: the third block is not filled, or a warp's few tiles want the deeper prefetch.
// KIVI_ATTN_RING=1 or 2 forces it (A/B knob).
inline int ring_stages_for(int bulk_tiles) {
  if (const int e = env_int("KIVI_ATTN_RING"); e == 1 || e == 2) return e;
  return bulk_tiles >= 256 ? 1 : 2;
}

// Plans the splits and launches the kernel (and the combine). bulk_tiles: 64-token tiles of the
// all-packed bulk (the capacity's, in static-store mode); tail_max: tokens past them. `exact`
// drops splits that would get no tile (the bulk is known on the host; in static-store mode it is not).
void plan_and_launch(AttnParams& p, const at::Tensor& q, bool fast, int bulk_tiles, int64_t tail_max, bool exact) {
  const auto dtype = q.scalar_type();
  const int64_t D = p.D, rows = static_cast<int64_t>(p.B) * p.Hkv * p.R;
  const void* kernel = nullptr;
  size_t smem = 0;
  if (fast) {
    dispatch_fast(dtype, p.kbits, p.vbits, D, [&](auto tT, auto kB, auto vB, auto dD) {
      using TT_ = typename decltype(tT)::type;
      constexpr int KB = decltype(kB)::value, VB = decltype(vB)::value, DD = decltype(dD)::value;
      auto pick = [&](auto nst) {
        constexpr int NST = decltype(nst)::value;
        constexpr bool NARROW = has_narrow_values<VB>();  // with PAIRED: blocks of at most 4 rows
        kernel = p.R <= 4 ? reinterpret_cast<const void*>(&attn_fused_kernel<TT_, KB, VB, DD, NST, NARROW, true>)
                          : reinterpret_cast<const void*>(&attn_fused_kernel<TT_, KB, VB, DD, NST, false, false>);
        smem = AttnGeo<KB, VB, DD, NST>::BLOCK_BYTES;
      };
      if constexpr (has_one_stage_ring<KB, VB, DD>()) {
        if (ring_stages_for(bulk_tiles) == 1) {
          pick(std::integral_constant<int, 1>{});
          return;
        }
      }
      pick(std::integral_constant<int, 2>{});
    });
  } else {
    dispatch_float(dtype, "decode_attention", [&](auto tag) {
      using TT_ = typename decltype(tag)::type;
      if (D <= 64) {
        kernel = reinterpret_cast<const void*>(&attn_generic_kernel<TT_, 2>);
      } else if (D <= 128) {
        kernel = reinterpret_cast<const void*>(&attn_generic_kernel<TT_, 4>);
      } else {
        kernel = reinterpret_cast<const void*>(&attn_generic_kernel<TT_, 8>);
      }
    });
    smem = static_cast<size_t>(WARPS * ROWS * D * 4 + 2 * WARPS * ROWS * 4);
  }
  const int dev = q.get_device();
  const int occ = blocks_per_sm(kernel, THREADS, smem, dev);
  const int target = num_sms(dev) * occ;
  const int64_t nbh = static_cast<int64_t>(p.B) * p.Hkv * p.n_chunks;
  // Splits per (KV head, row chunk) that fill one round of blocks.
  const int want = std::max(1, static_cast<int>(target / nbh));

  // Split plan: the bulk tiles [0, bulk_tiles) in n_bulk splits of tps tiles, and the tail.
  p.bulk_tiles = bulk_tiles;
  const int step = TAIL_TOKENS * WARPS;  // one 4-token step per warp
  const int cap = std::max(1, static_cast<int>(((QZ_MAX - 2) * p.G) / TT));  // q.z table capacity
  if (p.bulk_tiles > 0) {
    p.n_bulk = plan_bulk_splits(p.bulk_tiles, cap, nbh, target);
    if (fast) {
      // Tail apart (one step per warp in its own blocks, beside the bulk) when the bulk still fits
      // one round next to those blocks and its blocks get no longer than a merged tail step costs
      // (~1.5 tiles per warp, measured: GQA batch 1, 4k took 13 us apart and 18 us merged).
      const int n_sep = ceil_div(tail_max, step);
      const int n_apart = std::min(want - n_sep, p.bulk_tiles);
      p.tail_apart = n_apart >= ceil_div(p.bulk_tiles, cap) && nbh * p.n_bulk <= target &&
                     ceil_div(p.bulk_tiles, n_apart) <= ceil_div(p.bulk_tiles, p.n_bulk) + 3 * WARPS / 2;
      if (p.tail_apart) p.n_bulk = n_apart;
    }
    if (const int e = env_int("KIVI_ATTN_SPLITS"); e > 0) p.n_bulk = std::max(e, ceil_div(p.bulk_tiles, cap));  // knob
    if (const char* e = std::getenv("KIVI_ATTN_TAIL_APART")) p.tail_apart = std::atoi(e) != 0;                 // knob
    p.tps = ceil_div(p.bulk_tiles, p.n_bulk);
    if (exact) p.n_bulk = ceil_div(p.bulk_tiles, p.tps);
  } else {
    p.tail_apart = 1;
  }
  p.tail_start = p.bulk_tiles * TT;
  if (fast) {
    // merged: the tail spread over the bulk splits (or over more, where a round has room: `want`)
    const int spread = p.tail_apart ? 1 << 30 : std::max(std::max(p.n_bulk, want), 1);
    p.tail_chunk = std::max(step, ceil_div(ceil_div(tail_max, spread), step) * step);
    if (const int e = env_int("KIVI_ATTN_TAIL_CHUNK"); e > 0) p.tail_chunk = e;  // tuning knob
  } else {
    p.tail_chunk = std::max<int64_t>(16, ceil_div(tail_max, want));
    p.tail_chunk = (p.tail_chunk + WARPS - 1) / WARPS * WARPS;
  }
  p.n_tail = tail_max > 0 ? ceil_div(tail_max, p.tail_chunk) : 0;
  // the scalar kernel has tail chunks only (n_bulk = 0)
  p.n_splits = fast && !p.tail_apart ? std::max(p.n_bulk, p.n_tail) : p.n_bulk + p.n_tail;
  if (fast && exact && p.bulk_tiles > 0) plan_light_splits(p, nbh, target, cap);
  KIVI_CHECK(p.n_splits >= 1, "kivi: internal error: no split for ", p.T, " tokens");

  at::Tensor ws_acc, ws_ml;
  if (p.n_splits > 1) {
    ws_acc = at::empty({rows, p.n_splits, D}, q.options().dtype(at::kFloat));
    ws_ml = at::empty({rows, p.n_splits, 2}, q.options().dtype(at::kFloat));
    p.ws_acc = ws_acc.mutable_data_ptr<float>();
    p.ws_ml = ws_ml.mutable_data_ptr<float>();
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(p.n_splits, static_cast<unsigned>(nbh));
  void* args[] = {&p};  // the kernel chosen above, whose occupancy planned the splits
  C10_CUDA_CHECK(cudaLaunchKernel(kernel, grid, dim3(THREADS), args, smem, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.n_splits > 1) {
    launch_split_combine<true>(dtype, p.ws_acc, p.ws_ml, p.out, rows, p.n_splits, D, stream, dev);
  }
}

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& kc_in, const at::Tensor& ks_in,
                            const at::Tensor& kz_in, const at::Tensor& vc_in, const at::Tensor& vs_in,
                            const at::Tensor& vz_in, const at::Tensor& kr_in, const at::Tensor& vr_in, int64_t k_bits,
                            int64_t v_bits, int64_t G, double softmax_scale,
                            const std::optional<at::Tensor>& lengths_in) {
  check_bits_group(k_bits, G, "k_bits");
  check_bits_group(v_bits, G, "v_bits");
  check_float_4d(q_in, "q");
  check_codes(kc_in, "k_codes");
  check_float_4d(ks_in, "k_scale");
  check_float_4d(kz_in, "k_zero");
  check_codes(vc_in, "v_codes");
  check_float_4d(vs_in, "v_scale");
  check_float_4d(vz_in, "v_zero");
  check_float_4d(kr_in, "k_residual");
  check_float_4d(vr_in, "v_residual");
  const auto dtype = q_in.scalar_type();
  {
    const std::pair<const at::Tensor*, const char*> same[] = {{&ks_in, "k_scale"}, {&kz_in, "k_zero"},
                                                             {&vs_in, "v_scale"}, {&vz_in, "v_zero"},
                                                             {&kr_in, "k_residual"}, {&vr_in, "v_residual"}};
    for (const auto& [t, name] : same) {
      KIVI_CHECK(t->scalar_type() == dtype, "kivi: decode_attention needs one dtype for q, scales, zeros and residuals; q is ",
                  dtype, " but ", name, " is ", t->scalar_type());
    }
    const std::pair<const at::Tensor*, const char*> dev[] = {
        {&kc_in, "k_codes"}, {&ks_in, "k_scale"}, {&kz_in, "k_zero"},    {&vc_in, "v_codes"},
        {&vs_in, "v_scale"}, {&vz_in, "v_zero"},  {&kr_in, "k_residual"}, {&vr_in, "v_residual"}};
    for (const auto& [t, name] : dev) check_same_device(q_in, "q", *t, name);
  }
  const int64_t B = q_in.size(0), Hq = q_in.size(1), M = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = kc_in.size(1), PK = 8 / k_bits, PV = 8 / v_bits;
  const int64_t Tk = kc_in.size(2) * PK, Tv = vc_in.size(2), Rk = kr_in.size(2), Rv = vr_in.size(2), T = Tk + Rk;
  KIVI_CHECK(Hkv > 0 && Hq % Hkv == 0, "kivi: q heads (", Hq, ") must be a multiple of the KV heads (", Hkv, ")");
  KIVI_CHECK(kc_in.size(0) == B && kc_in.size(3) == D && Tk % G == 0,
              "kivi: k_codes must be [B, Hkv, Tk*bits/8, D] = [", B, ", ", Hkv, ", Tk*", k_bits, "/8, ", D,
              "] with Tk a multiple of group_size ", G, ", got ", kc_in.sizes());
  for (const auto* t : {&ks_in, &kz_in}) {
    KIVI_CHECK(t->size(0) == B && t->size(1) == Hkv && t->size(2) == Tk / G && t->size(3) == D,
                "kivi: k_scale/k_zero must be [", B, ", ", Hkv, ", ", Tk / G, ", ", D, "], got ", t->sizes());
  }
  KIVI_CHECK(D % G == 0 && D % PV == 0, "kivi: head_dim (", D, ") must be a multiple of group_size (", G, ")");
  KIVI_CHECK(vc_in.size(0) == B && vc_in.size(1) == Hkv && vc_in.size(3) * PV == D,
              "kivi: v_codes must be [", B, ", ", Hkv, ", Tv, ", D / PV, "], got ", vc_in.sizes());
  for (const auto* t : {&vs_in, &vz_in}) {
    KIVI_CHECK(t->size(0) == B && t->size(1) == Hkv && t->size(2) == Tv && t->size(3) == D / G,
                "kivi: v_scale/v_zero must be [", B, ", ", Hkv, ", ", Tv, ", ", D / G, "], got ", t->sizes());
  }
  KIVI_CHECK(kr_in.size(0) == B && kr_in.size(1) == Hkv && kr_in.size(3) == D && vr_in.size(0) == B &&
                  vr_in.size(1) == Hkv && vr_in.size(3) == D,
              "kivi: k_residual and v_residual must be [", B, ", ", Hkv, ", tokens, ", D, "], got ", kr_in.sizes(),
              " and ", vr_in.sizes());
  KIVI_CHECK(Tv + Rv == T, "kivi: keys hold ", T, " tokens (", Tk, " packed + ", Rk, " residual) but values hold ",
              Tv + Rv, " (", Tv, " + ", Rv, ")");
  KIVI_CHECK(D >= 1 && D <= 256, "kivi: the CUDA decode_attention supports head_dim up to 256, got ", D);
  const int64_t n_rep = Hq / Hkv, R = n_rep * M;
  check_fits_int32(T, "token count");
  check_fits_int32(B * Hkv * R, "batch * heads * query rows");
  const at::Tensor* lengths = nullptr;
  at::Tensor len_c;
  if (lengths_in.has_value() && lengths_in->defined()) {
    const auto& l = *lengths_in;
    check_same_device(q_in, "q", l, "lengths");
    KIVI_CHECK(l.dim() == 1 && l.size(0) == B && (l.scalar_type() == at::kInt || l.scalar_type() == at::kLong),
                "kivi: lengths must be an int32/int64 tensor of shape [", B, "], got ", l.scalar_type(), " ",
                l.sizes());
    len_c = l.contiguous();
    lengths = &len_c;
  }

  const c10::cuda::CUDAGuard guard(q_in.device());
  auto out = at::empty({B, Hq, M, D}, q_in.options());
  if (out.numel() == 0) return out;
  if (T == 0) return out.zero_();  // nothing to attend to: an empty sum, like the reference's p @ v
  const auto q = q_in.contiguous();
  const auto kc = rows_contiguous(kc_in), ks = rows_contiguous(ks_in), kz = rows_contiguous(kz_in);
  const auto vc = rows_contiguous(vc_in), vs = rows_contiguous(vs_in), vz = rows_contiguous(vz_in);
  const auto kr = rows_contiguous(kr_in), vr = rows_contiguous(vr_in);

  AttnParams p = make_params(q, out, kc, ks, kz, vc, vs, vz, kr, vr, k_bits, v_bits, G, softmax_scale, Tk, Tv, T);
  p.lengths = lengths ? lengths->const_data_ptr() : nullptr;
  p.len64 = lengths && lengths->scalar_type() == at::kLong;
  int bulk_tiles = !force_generic() && fast_path_ok(q, kc, ks, kz, vc, k_bits, v_bits, G)
                       ? static_cast<int>(std::min(Tk, Tv) / TT)
                       : 0;
  // a view whose last bulk run ends within 15 bytes of its storage's end, off a 16-byte boundary: that
  // tile goes to the tail, which reads only the run's bytes; scales in a storage that starts off a
  // 16-byte boundary (external memory): no bulk at all
  if (bulk_tiles > 0 && !vsz_reads_in_storage(vs, vz, int64_t{bulk_tiles} * TT)) --bulk_tiles;
  if (bulk_tiles > 0 && !vsz_reads_in_storage(vs, vz, int64_t{bulk_tiles} * TT)) bulk_tiles = 0;
  const bool fast = bulk_tiles > 0;
  p.res_vec = aligned_view(kr, 2) && aligned_view(vr, 2);
  plan_and_launch(p, q, fast, bulk_tiles, /*tail_max=*/T - static_cast<int64_t>(bulk_tiles) * TT, /*exact=*/true);
  return out;
}

// kivi::_static_decode_attention: one decode step (M = 1 query token) straight from the stores of
// kivi::static_kv_attention, the token count `end` (int64 [1]) on the device, so the step can be
// captured in a CUDA graph. Keys: codes [B,Hkv,Ck*kbits/8,D] (Ck = capacity in tokens, a multiple of
// G), scale/zero [B,Hkv,Ck/G,D], ring [B,Hkv,Rr,D]; values: codes [B,Hkv,C,D*vbits/8], scale/zero
// [B,Hkv,C,D/G], ring [B,Hkv,Rr,D]. Token t < end reads its key from codes if t < floor(end/Rr)*Rr,
// else ring slot t % Rr; its value from codes if t < end - Rr, else ring slot t % Rr. mask_bits
// (int32 [B or 1, ceil(C/32)], optional) hides token t where bit t % 32 of word t / 32 is clear.
// Tensor-core path only: fp16/bf16, 2/4 bits, head_dim 64/128, G 32/64/128 (static_cache.cpp checks).
at::Tensor static_decode_attention(const at::Tensor& q_in, const at::Tensor& kc_in, const at::Tensor& ks_in,
                                   const at::Tensor& kz_in, const at::Tensor& vc_in, const at::Tensor& vs_in,
                                   const at::Tensor& vz_in, const at::Tensor& kr_in, const at::Tensor& vr_in,
                                   const at::Tensor& end, const std::optional<at::Tensor>& mask_bits, int64_t k_bits,
                                   int64_t v_bits, int64_t G, int64_t ring, double softmax_scale) {
  check_bits_group(k_bits, G, "k_bits");
  check_bits_group(v_bits, G, "v_bits");
  const auto dtype = q_in.scalar_type();
  const int64_t B = q_in.size(0), Hq = q_in.size(1), M = q_in.size(2), D = q_in.size(3), Hkv = kc_in.size(1);
  const int64_t Tk = kc_in.size(2) * (8 / k_bits), C = vc_in.size(2);
  KIVI_CHECK(M == 1 && Hkv > 0 && Hq % Hkv == 0 && kr_in.size(2) == ring && vr_in.size(2) == ring && Tk >= C,
              "kivi: _static_decode_attention got q ", q_in.sizes(), ", key codes ", kc_in.sizes(), ", value codes ",
              vc_in.sizes(), ", rings ", kr_in.sizes(), " ", vr_in.sizes(), " (residual_length ", ring, ")");
  KIVI_CHECK(end.numel() == 1 && end.scalar_type() == at::kLong && end.device() == q_in.device(),
              "kivi: end must be an int64 [1] tensor on q's device");
  const c10::cuda::CUDAGuard guard(q_in.device());
  auto out = at::empty({B, Hq, M, D}, q_in.options());
  auto q = q_in.contiguous();
  if (!aligned16(q.const_data_ptr())) q = q.clone();
  const auto kc = rows_contiguous(kc_in), ks = rows_contiguous(ks_in), kz = rows_contiguous(kz_in);
  const auto vc = rows_contiguous(vc_in), vs = rows_contiguous(vs_in), vz = rows_contiguous(vz_in);
  const auto kr = rows_contiguous(kr_in), vr = rows_contiguous(vr_in);
  AttnParams p = make_params(q, out, kc, ks, kz, vc, vs, vz, kr, vr, k_bits, v_bits, G, softmax_scale, Tk, C, C);
  p.res_vec = aligned_view(kr, 2) && aligned_view(vr, 2);
  KIVI_CHECK(fast_path_ok(q, kc, ks, kz, vc, k_bits, v_bits, G) &&
                  C >= ring + TT,
              "kivi: _static_decode_attention needs the tensor-core path (fp16/bf16, 2/4 bits, head_dim 64/128, "
              "group 32/64/128, aligned stores of at least residual_length + 64 tokens)");
  p.dyn_end = end.const_data_ptr<int64_t>();
  p.ring = static_cast<int>(ring);
  at::Tensor bits;
  if (mask_bits.has_value() && mask_bits->defined()) {
    bits = mask_bits->contiguous();
    KIVI_CHECK(bits.scalar_type() == at::kInt && bits.dim() == 2 && (bits.size(0) == B || bits.size(0) == 1) &&
                    bits.size(1) * 32 >= C && bits.device() == q_in.device(),
                "kivi: mask_bits must be int32 [", B, " or 1, >= ", (C + 31) / 32, "] on q's device, got ",
                bits.scalar_type(), " ", bits.sizes());
    p.mask_bits = reinterpret_cast<const uint32_t*>(bits.const_data_ptr<int>());
    p.mask_bstride = bits.size(0) == 1 ? 0 : static_cast<int>(bits.size(1));
  }
  // the largest bulk is [0, C - ring); the tail past it is at most ring + TT - 1 tokens
  const int bulk_tiles = static_cast<int>((C - ring) / TT);
  // holds for the cache's stores: their scale and zero regions are followed by codes (static_cache.cpp)
  KIVI_CHECK(vsz_reads_in_storage(vs, vz, int64_t{bulk_tiles} * TT),
              "kivi: _static_decode_attention reads the value scales and zeros in whole 16-byte chunks: each "
              "16-byte granule they touch must lie in their storage");
  plan_and_launch(p, q, /*fast=*/true, bulk_tiles, std::min<int64_t>(ring + TT - 1, C), /*exact=*/false);
  return out;
}

}  // namespace
}  // namespace kivi::cuda

TORCH_LIBRARY_IMPL(kivi, CUDA, m) {
  m.impl("decode_attention", &kivi::cuda::decode_attention);
  m.impl("_static_decode_attention", &kivi::cuda::static_decode_attention);
}
