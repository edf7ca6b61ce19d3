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
// This file: the block's merge, the kernels, the split plan and the launch. The paths they run:
// attn_fast.cuh (bulk tiles), attn_tail.cuh (tail chunks), attn_scalar.cuh (scalar kernel); their
// parameters: attn_params.cuh.
#include <torch/library.h>

#include <optional>

#include "attn_fast.cuh"
#include "attn_scalar.cuh"
#include "attn_tail.cuh"
#include "split_combine.cuh"

namespace kivi::cuda {
namespace {

using namespace tile;

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
  pdl_wait_primary();       // launched early: the kernel before (q, the cache, lengths) is done past here
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
  pdl_wait_primary();
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
  // With pdl_for_split_kernels (off by default) the kernel's launch and block placement overlap the
  // end of the kernel before it on the stream (every block waits for that kernel's end and its writes
  // before it reads anything: pdl_wait_primary); the combine always launches early after this kernel.
  const LaunchConfig launch_cfg(dim3(p.n_splits, static_cast<unsigned>(nbh)), dim3(THREADS), smem, stream,
                                pdl_for_split_kernels(dev));
  void* args[] = {&p};  // the kernel chosen above, whose occupancy planned the splits
  C10_CUDA_CHECK(cudaLaunchKernelExC(&launch_cfg.cfg, kernel, args));
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
