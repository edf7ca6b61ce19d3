// Decode attention's fast path: the bulk tiles of one block, streamed through each warp's cp.async
// ring and computed with tensor cores (kv_tile.cuh), the online softmax per warp; its build knobs
// and the shared-memory sizes the launch plan needs (decode_attention.cu).
// Included by decode_attention.cu alone, in its anonymous namespace (internal linkage, as there).
#pragma once

#include "attn_params.cuh"

namespace kivi::cuda {
namespace {

using namespace tile;

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

}  // namespace
}  // namespace kivi::cuda
