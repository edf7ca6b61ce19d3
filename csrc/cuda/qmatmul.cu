// CUDA Q_MatMul straight from packed codes (nothing dequantized reaches memory), grouped-query
// mapping: query head h reads KV head h / (Hq / Hkv).
//   qmatmul_keys:   q [B, Hq, M, D] @ dequant(K)^T -> scores [B, Hq, M, T] in q.dtype
//   qmatmul_values: p [B, Hq, M, T] @ dequant(V)   -> [B, Hq, M, D]     in p.dtype
// float32 accumulation. Same tiles as decode attention (kv_tile.cuh) minus the softmax: a block =
// one KV head x up to 8 query rows x a range of 64-token tiles, each warp streaming its own tiles.
// Keys write their scores tile by tile (staged through shared memory for coalesced stores);
// values reduce over tokens, so splits write float32 partial sums that split_combine_kernel adds.
// Shapes outside the fast path (float32, 8 bits, head_dim not 64/128, group size not 32/64/128,
// unaligned buffers) run scalar kernels.
#include <torch/library.h>

#include "kv_tile.cuh"
#include "split_combine.cuh"

namespace kivi::cuda {
namespace {

using namespace tile;

struct QMParams {
  const void* x;  // q [B*Hkv*R, D] (keys) or p [B*Hkv*R, T] (values), contiguous
  void* out;      // scores [B*Hkv*R, T] or out [B*Hkv*R, D]
  float* ws;      // values: [B*Hkv*R, S, D] partial sums
  View c, s, z;   // codes, scale, zero
  int B, Hkv, R, n_chunks, D, G, bits, T;
  int n_splits, tps, ntiles, chunk;  // fast: tiles of TT tokens, tps per split; generic: chunk tokens per split
};

struct Coords {
  int split, bh, b, h, r0, nrows;
};

__device__ __forceinline__ Coords coords(const QMParams& p) {
  Coords c;
  c.split = blockIdx.x;
  const int y = blockIdx.y;
  c.bh = y / p.n_chunks;
  c.b = c.bh / p.Hkv;
  c.h = c.bh % p.Hkv;
  c.r0 = (y % p.n_chunks) * ROWS;
  c.nrows = min(ROWS, p.R - c.r0);
  return c;
}

// ------------------------------------------------------------------------------------------------
// qmatmul_keys
// ------------------------------------------------------------------------------------------------

template <typename T, int KB, int D>
__global__ void __launch_bounds__(THREADS) qk_fast_kernel(const __grid_constant__ QMParams p) {
  using GEO = Geo<KB, 2, D, true, false>;
  extern __shared__ __align__(16) unsigned char smem[];
  pdl_wait_primary();  // launched early (launch_qm): the kernel before is done past here
  const Coords c = coords(p);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tid = lane & 3;
  const int G = p.G, log2G = __ffs(G) - 1, T_ = p.T;
  const T* qh = static_cast<const T*>(p.x) + (static_cast<int64_t>(c.bh) * p.R + c.r0) * D;
  T* oh = static_cast<T*>(p.out) + (static_cast<int64_t>(c.bh) * p.R + c.r0) * T_;
  const uint8_t* kc = at_head<uint8_t>(p.c, c.b, c.h);
  const T* ks = at_head<T>(p.s, c.b, c.h);
  const T* kz = at_head<T>(p.z, c.b, c.h);
  uint32_t* qperm = reinterpret_cast<uint32_t*>(smem + GEO::OFF_QP);
  float* qz = reinterpret_cast<float*>(smem + GEO::OFF_QZ);
  unsigned char* wb = smem + GEO::OFF_W + warp * GEO::WARP_BYTES;
  uint32_t* pb = reinterpret_cast<uint32_t*>(wb + GEO::OFF_PB);

  const int tile_beg = c.split * p.tps, tile_end = min(tile_beg + p.tps, p.ntiles);
  const int ntiles = tile_end - tile_beg;
  const int gA = tile_beg * TT / G;
  const int ng = (min(tile_end * TT, T_) - 1) / G + 1 - gA;
  const int nmy = warp < ntiles ? (ntiles - warp + WARPS - 1) / WARPS : 0;
  auto tile_t0 = [&](int it) { return (tile_beg + warp + WARPS * it) * TT; };
  auto stage = [&](int it) {
    const int t0 = tile_t0(it);
    stage_keys<GEO, D>(wb + (it % STAGES) * GEO::STAGE_BYTES, kc, reinterpret_cast<const unsigned char*>(ks), t0,
                       min(TT, T_ - t0), log2G, lane);
  };
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nmy) stage(s);
    cp_async_commit();
  }
  // the query tables after the first tiles are requested, as in decode attention: their loads and
  // the tiles' overlap (a block of one or two tiles, short contexts, waited for each in turn)
  fill_qperm<T, D, GEO::QPS>(qperm, qh, c.nrows);
  qz_prologue<T, D>(qz, kz, qh, c.nrows, gA, ng, warp, lane, 1.f);
  __syncthreads();

  const uint32_t* qmine = qperm + (gid * 4 + tid) * GEO::QPS;
  for (int it = 0; it < nmy; ++it) {
    if (it + STAGES - 1 < nmy) stage(it + STAGES - 1);
    cp_async_commit();
    cp_async_wait<STAGES - 1>();
    __syncwarp();
    const int t0 = tile_t0(it);
    float S[GEO::NMT][4];
    key_scores<T, GEO, KB, D>(wb + (it % STAGES) * GEO::STAGE_BYTES, t0, log2G, qmine, qz, gA, 1.f, S, lane,
                              2 * (lane & 3));
    write_pairs<T, GEO>(pb, S, lane);
    __syncwarp();
    // rows of 64 tokens = 32 pairs: one 4-byte store per lane (T is a multiple of G, so even)
    const int t = t0 + 2 * lane;
    if (t < T_) {
      for (int r = 0; r < c.nrows; ++r) {
        *reinterpret_cast<uint32_t*>(oh + static_cast<int64_t>(r) * T_ + t) = pb[r * PS + lane];
      }
    }
    __syncwarp();
  }
  cp_async_wait<0>();
}

template <typename T, int DJ>
__global__ void __launch_bounds__(THREADS) qk_generic_kernel(const __grid_constant__ QMParams p) {
  pdl_wait_primary();
  const Coords c = coords(p);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int D = p.D, T_ = p.T;
  const T* qh = static_cast<const T*>(p.x) + (static_cast<int64_t>(c.bh) * p.R + c.r0) * D;
  T* oh = static_cast<T*>(p.out) + (static_cast<int64_t>(c.bh) * p.R + c.r0) * T_;
  const uint8_t* kc = at_head<uint8_t>(p.c, c.b, c.h);
  const T* ks = at_head<T>(p.s, c.b, c.h);
  const T* kz = at_head<T>(p.z, c.b, c.h);
  float q[ROWS][DJ];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
#pragma unroll
    for (int j = 0; j < DJ; ++j) {
      const int d = lane + 32 * j;
      q[r][j] = (r < c.nrows && d < D) ? to_f(qh[r * D + d]) : 0.f;
    }
  }
  const int ta = c.split * p.chunk, tb = min(ta + p.chunk, T_);
  for (int t = ta + warp; t < tb; t += WARPS) {
    float kv[DJ];
#pragma unroll
    for (int j = 0; j < DJ; ++j) {
      const int d = lane + 32 * j;
      kv[j] = d < D ? key_elem<T>(kc, ks, kz, t, d, D, p.bits, p.G) : 0.f;
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (r < c.nrows) {
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < DJ; ++j) s = fmaf(q[r][j], kv[j], s);
        s = warp_sum(s);
        if (lane == 0) oh[static_cast<int64_t>(r) * T_ + t] = from_f<T>(s);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// qmatmul_values
// ------------------------------------------------------------------------------------------------

// Sum the block's warps (red in shared memory) into the output (one split) or the split's partial.
template <typename T>
__device__ __forceinline__ void block_sum(const QMParams& p, const float* red, const Coords& c) {
  const int D = p.D;
  for (int e = threadIdx.x; e < c.nrows * D; e += THREADS) {
    const int r = e / D, d = e - r * D;
    float a = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) a += red[(w * ROWS + r) * D + d];
    const int64_t row = static_cast<int64_t>(c.bh) * p.R + c.r0 + r;
    if (p.n_splits == 1) {
      static_cast<T*>(p.out)[row * D + d] = from_f<T>(a);
    } else {
      p.ws[(row * p.n_splits + c.split) * D + d] = a;
    }
  }
}

// p pairs (p[r][t], p[r][t + 1]) of row r < nrows for the tokens t = t0 + 2*lane (0 past T).
template <typename T>
__device__ __forceinline__ void load_p_pairs(uint32_t (&pp)[ROWS], const T* ph, int T_, int nrows, int t0, int lane) {
  const int t = t0 + 2 * lane;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    uint32_t lo = 0, hi = 0;
    if (r < nrows) {
      const T* row = ph + static_cast<int64_t>(r) * T_;
      if (t < T_) lo = elem_bits(row[t]);
      if (t + 1 < T_) hi = elem_bits(row[t + 1]);
    }
    pp[r] = lo | (hi << 16);
  }
}

// The value tile's products: A = dequantized values, B = p (value_accum_dequant: exact products, the
// accuracy of dequantize-then-matmul at any T). Decode attention's B = p * s (value_accum) loses bits
// where p * s is below fp16's normal range: 2.6-3.4e-3 error at 32k, 4 bits (H200, a2c09f2, A/B).
template <typename T, int VB, int D>
__global__ void __launch_bounds__(THREADS) pv_fast_kernel(const __grid_constant__ QMParams p) {
  using GEO = Geo<2, VB, D, false, true>;
  pdl_launch_dependents();  // the split combine may launch now: it waits for this grid's end
  pdl_wait_primary();       // launched early (launch_qm): the kernel before is done past here
  extern __shared__ __align__(16) unsigned char smem[];
  const Coords c = coords(p);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int G = p.G, NG = D / G, log2G = __ffs(G) - 1, T_ = p.T;
  const T* ph = static_cast<const T*>(p.x) + (static_cast<int64_t>(c.bh) * p.R + c.r0) * T_;
  const uint8_t* vc = at_head<uint8_t>(p.c, c.b, c.h);
  const unsigned char* vs = reinterpret_cast<const unsigned char*>(at_head<T>(p.s, c.b, c.h));
  const unsigned char* vz = reinterpret_cast<const unsigned char*>(at_head<T>(p.z, c.b, c.h));
  unsigned char* wb = smem + GEO::OFF_W + warp * GEO::WARP_BYTES;
  uint32_t* sps = reinterpret_cast<uint32_t*>(wb + GEO::OFF_SPS);
  uint32_t* spz = reinterpret_cast<uint32_t*>(wb + GEO::OFF_SPZ);
  uint32_t* pb = reinterpret_cast<uint32_t*>(wb + GEO::OFF_PB);

  float acc[D / 16][4];
#pragma unroll
  for (int i = 0; i < D / 16; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  const int tile_beg = c.split * p.tps, tile_end = min(tile_beg + p.tps, p.ntiles);
  const int ntiles = tile_end - tile_beg;
  const int nmy = warp < ntiles ? (ntiles - warp + WARPS - 1) / WARPS : 0;
  auto tile_t0 = [&](int it) { return (tile_beg + warp + WARPS * it) * TT; };
  auto stage = [&](int it) {
    const int t0 = tile_t0(it);
    stage_values<GEO, D>(wb + (it % STAGES) * GEO::STAGE_BYTES, vc, vs, vz, t0, min(TT, T_ - t0), NG, lane);
  };
  uint32_t pnext[ROWS];
  if (nmy > 0) load_p_pairs<T>(pnext, ph, T_, c.nrows, tile_t0(0), lane);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nmy) stage(s);
    cp_async_commit();
  }
  for (int it = 0; it < nmy; ++it) {
    if (it + STAGES - 1 < nmy) stage(it + STAGES - 1);
    cp_async_commit();
    const int t0 = tile_t0(it);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) pb[r * PS + lane] = pnext[r];
    if (it + 1 < nmy) load_p_pairs<T>(pnext, ph, T_, c.nrows, tile_t0(it + 1), lane);  // in flight during this tile
    cp_async_wait<STAGES - 1>();
    __syncwarp();
    const unsigned char* st = wb + (it % STAGES) * GEO::STAGE_BYTES;
    const int soff = static_cast<int>(reinterpret_cast<uintptr_t>(vs + static_cast<int64_t>(t0) * NG * 2) & 15);
    const int zoff = static_cast<int>(reinterpret_cast<uintptr_t>(vz + static_cast<int64_t>(t0) * NG * 2) & 15);
    transpose_vsz_any<GEO>(st, sps, spz, soff, zoff, NG, log2G, min(TT, T_ - t0), lane);
    __syncwarp();
    value_accum_dequant<T, GEO, VB, D>(st, sps, spz, pb, acc, lane);
    __syncwarp();
  }
  cp_async_wait<0>();
  __syncthreads();  // the sum buffer aliases every warp's ring
  float* red = reinterpret_cast<float*>(smem);
  write_warp_values<GEO, D>(red, warp, acc, lane);
  __syncthreads();
  block_sum<T>(p, red, c);
}

template <typename T, int DJ>
__global__ void __launch_bounds__(THREADS) pv_generic_kernel(const __grid_constant__ QMParams p) {
  pdl_launch_dependents();
  pdl_wait_primary();
  extern __shared__ __align__(16) unsigned char smem[];
  const Coords c = coords(p);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int D = p.D, T_ = p.T;
  const T* ph = static_cast<const T*>(p.x) + (static_cast<int64_t>(c.bh) * p.R + c.r0) * T_;
  const uint8_t* vc = at_head<uint8_t>(p.c, c.b, c.h);
  const T* vs = at_head<T>(p.s, c.b, c.h);
  const T* vz = at_head<T>(p.z, c.b, c.h);
  float acc[ROWS][DJ];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
#pragma unroll
    for (int j = 0; j < DJ; ++j) acc[r][j] = 0.f;
  }
  const int ta = c.split * p.chunk, tb = min(ta + p.chunk, T_);
  for (int t = ta + warp; t < tb; t += WARPS) {
    float vv[DJ];
#pragma unroll
    for (int j = 0; j < DJ; ++j) {
      const int d = lane + 32 * j;
      vv[j] = d < D ? value_elem<T>(vc, vs, vz, t, d, D, p.bits, p.G) : 0.f;
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (r < c.nrows) {
        const float w = to_f(ph[static_cast<int64_t>(r) * T_ + t]);
#pragma unroll
        for (int j = 0; j < DJ; ++j) acc[r][j] = fmaf(w, vv[j], acc[r][j]);
      }
    }
  }
  float* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
#pragma unroll
    for (int j = 0; j < DJ; ++j) {
      const int d = lane + 32 * j;
      if (d < D) red[(warp * ROWS + r) * D + d] = acc[r][j];
    }
  }
  __syncthreads();
  block_sum<T>(p, red, c);
}

// ------------------------------------------------------------------------------------------------
// Host
// ------------------------------------------------------------------------------------------------

void check_packed(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero) {
  check_codes(codes, "codes");
  check_float_4d(scale, "scale");
  check_float_4d(zero, "zero");
  check_same_device(codes, "codes", scale, "scale");
  check_same_device(codes, "codes", zero, "zero");
  KIVI_CHECK(scale.sizes() == zero.sizes() && scale.scalar_type() == zero.scalar_type(), "kivi: scale ",
              scale.sizes(), " ", scale.scalar_type(), " and zero ", zero.sizes(), " ", zero.scalar_type(),
              " must have the same shape and dtype");
}

void check_query(const at::Tensor& x, const char* name, const at::Tensor& codes, const at::Tensor& scale, int64_t B,
                 int64_t Hkv) {
  check_float_4d(x, name);
  check_same_device(codes, "codes", x, name);
  KIVI_CHECK(x.scalar_type() == scale.scalar_type(), "kivi: ", name, " dtype (", x.scalar_type(),
              ") must match the cache's scale dtype (", scale.scalar_type(), ")");
  KIVI_CHECK(x.size(0) == B, "kivi: ", name, " batch (", x.size(0), ") must match the cache batch (", B, ")");
  KIVI_CHECK(Hkv > 0 && x.size(1) % Hkv == 0, "kivi: ", name, " heads (", x.size(1),
              ") must be a multiple of the KV heads (", Hkv, ")");
}

// (KV head, row chunk) pairs: the grid's y dimension.
inline int64_t head_blocks(const QMParams& p) { return static_cast<int64_t>(p.B) * p.Hkv * p.n_chunks; }

// Launches a split kernel over grid (p.n_splits, nbh); with pdl_for_split_kernels (off by default)
// its launch overlaps the end of the kernel before it, which its blocks wait for (pdl_wait_primary).
template <typename Kernel>
void launch_qm(Kernel kernel, const QMParams& p, int64_t nbh, size_t smem, cudaStream_t stream, int dev) {
  const LaunchConfig launch_cfg(dim3(p.n_splits, static_cast<unsigned>(nbh)), dim3(THREADS), smem, stream,
                                pdl_for_split_kernels(dev));
  C10_CUDA_CHECK(cudaLaunchKernelEx(&launch_cfg.cfg, kernel, p));
}

// The parameters both ops share: x (q or p, contiguous [B, Hq, M, *]), out, the packed cache
// (codes [B, Hkv, ...] and its scales and zeros, rows contiguous), R query rows per KV head, head_dim
// D, T tokens.
QMParams make_params(const at::Tensor& x, at::Tensor& out, const at::Tensor& codes, const at::Tensor& scale,
                     const at::Tensor& zero, int64_t R, int64_t D, int64_t G, int64_t bits, int64_t T) {
  QMParams p{};
  p.x = x.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.c = view_of(codes);
  p.s = view_of(scale);
  p.z = view_of(zero);
  p.B = static_cast<int>(codes.size(0));
  p.Hkv = static_cast<int>(codes.size(1));
  p.R = static_cast<int>(R);
  p.n_chunks = ceil_div(R, ROWS);
  p.D = static_cast<int>(D);
  p.G = static_cast<int>(G);
  p.bits = static_cast<int>(bits);
  p.T = static_cast<int>(T);
  const int64_t nbh = head_blocks(p);
  KIVI_CHECK(nbh <= 65535, "kivi: batch * KV heads * ceil(query rows / 8) = ", nbh, " exceeds 65535");
  return p;
}

// Whether the tensor-core kernels cover this dtype, width, head_dim and group size (the buffers'
// alignment is checked beside), unless KIVI_CUDA_GENERIC forces the scalar kernels.
inline bool tensor_core_shape(at::ScalarType dtype, int64_t bits, int64_t D, int64_t G) {
  return !force_generic() && (dtype == at::kHalf || dtype == at::kBFloat16) && (bits == 2 || bits == 4) &&
         (D == 64 || D == 128) && (G == 32 || G == 64 || G == 128);
}

// Splits per (KV head, row chunk) that fill the GPU: `target` resident blocks over nbh heads.
inline int splits_wanted(const void* kernel, size_t smem, int dev, int64_t nbh) {
  const int occ = blocks_per_sm(kernel, THREADS, smem, dev);
  return std::max(1, ceil_div(static_cast<int64_t>(num_sms(dev)) * occ, nbh));
}

// Tiles per split of the tensor-core kernels (p.tps, p.n_splits) over `ntiles` 64-token tiles, at
// most `cap` per split: plan_bulk_splits, which counts the rounds of resident blocks. (ceil(slots / nbh)
// splits put nbh * splits blocks just past the slots, e.g. 448 blocks in 396 slots for GQA batch 8, 32k,
// 4 bits: values 1.45x slower than whole rounds on the H200, 2026-11-30.)
// KIVI_QM_SPLITS=n forces n splits (at least the cap's minimum): a tuning knob for benchmarks.
// Value splits hold at least kMinValueTilesPerSplit tiles (KIVI_QM_MIN_TPS=m overrides it, for A/B):
// the plan alone fills one round with one-tile splits at short contexts, whose partial sums then cost
// more to write and add than the extra tiles per block. At least 4 measured 0.77-1.00 of the plan's
// time on every values row from 1k to 32k (MHA and GQA, batch 1 and 8, 2 and 4 bits; GQA batch 1, 4k:
// 9.0 -> 7.3 us at 2 bits; H200, 53e232c), at least 2 0.90-1.05, 8 0.91-1.30, 16 up to 1.95. Where
// the plan's count fits in one round of resident blocks (the short rows this is for), the clamped
// count does too: the best the cost model allows.
constexpr int kMinValueTilesPerSplit = 4;
inline void plan_fast_splits(QMParams& p, int ntiles, int cap, int64_t nbh, const void* kernel, size_t smem, int dev,
                             int min_tps = 1) {
  p.ntiles = ntiles;
  if (const int n = env_int("KIVI_QM_SPLITS"); n > 0) {
    p.tps = std::min(ceil_div(ntiles, std::min(n, ntiles)), cap);
  } else {
    const int64_t slots = static_cast<int64_t>(num_sms(dev)) * blocks_per_sm(kernel, THREADS, smem, dev);
    const int most = std::max(1, ntiles / std::max(1, min_tps));
    const int splits = std::min(plan_bulk_splits(ntiles, cap, nbh, slots), most);
    p.tps = ceil_div(ntiles, splits);
  }
  p.n_splits = ceil_div(ntiles, p.tps);
}

at::Tensor qmatmul_keys(const at::Tensor& q_in, const at::Tensor& codes_in, const at::Tensor& scale_in,
                        const at::Tensor& zero_in, int64_t bits, int64_t G) {
  check_bits_group(bits, G);
  check_packed(codes_in, scale_in, zero_in);
  const int64_t B = codes_in.size(0), Hkv = codes_in.size(1), P = 8 / bits, T = codes_in.size(2) * P;
  const int64_t D = codes_in.size(3);
  KIVI_CHECK(T % G == 0 && scale_in.size(0) == B && scale_in.size(1) == Hkv && scale_in.size(2) == T / G &&
                  scale_in.size(3) == D,
              "kivi: codes ", codes_in.sizes(), " hold ", T, " tokens at ", bits, " bits, so scale/zero must be [", B,
              ", ", Hkv, ", ", T / G, ", ", D, "] for group_size ", G, ", got ", scale_in.sizes());
  check_query(q_in, "q", codes_in, scale_in, B, Hkv);
  KIVI_CHECK(q_in.size(3) == D, "kivi: q's head_dim (", q_in.size(3), ") must match the keys' (", D, ")");
  KIVI_CHECK(D >= 1 && D <= 256, "kivi: the CUDA qmatmul_keys supports head_dim up to 256, got ", D);
  const int64_t Hq = q_in.size(1), M = q_in.size(2), R = (Hq / Hkv) * M;
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int dev = q_in.get_device();
  auto out = at::empty({B, Hq, M, T}, q_in.options());
  if (out.numel() == 0) return out;
  check_fits_int32(T, "token count");
  check_fits_int32(B * Hkv * R, "batch * heads * query rows");
  const auto q = q_in.contiguous();
  const auto codes = rows_contiguous(codes_in), scale = rows_contiguous(scale_in), zero = rows_contiguous(zero_in);
  const auto dtype = q.scalar_type();
  QMParams p = make_params(q, out, codes, scale, zero, R, D, G, bits, T);
  const int64_t nbh = head_blocks(p);
  const bool fast = tensor_core_shape(dtype, bits, D, G) && aligned_view(codes, 1) && aligned_view(scale, 2) &&
                    aligned_view(zero, 2) && aligned16(p.x) && aligned16(p.out);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (fast) {
    auto launch = [&](auto tT, auto kB, auto dD) {
      using TT_ = typename decltype(tT)::type;
      constexpr int KB = decltype(kB)::value, DD = decltype(dD)::value;
      const auto kernel = &qk_fast_kernel<TT_, KB, DD>;
      const size_t smem = Geo<KB, 2, DD, true, false>::BLOCK_BYTES;
      const int cap = std::max(1, static_cast<int>(((QZ_MAX - 2) * G) / TT));  // the q.z table's groups
      plan_fast_splits(p, ceil_div(T, TT), cap, nbh, reinterpret_cast<const void*>(kernel), smem, dev);
      launch_qm(kernel, p, nbh, smem, stream, dev);
    };
    dispatch_tc_dtype(dtype, [&](auto tT) {
      dispatch_tc_bits(bits, [&](auto kB) { dispatch_tc_dim(D, [&](auto dD) { launch(tT, kB, dD); }); });
    });
  } else {
    dispatch_float(dtype, "qmatmul_keys", [&](auto tag) {
      using TT_ = typename decltype(tag)::type;
      auto launch = [&](auto kernel) {
        const int want = splits_wanted(reinterpret_cast<const void*>(kernel), 0, dev, nbh);
        p.chunk = std::max(16, ceil_div(T, want));
        p.n_splits = ceil_div(T, p.chunk);
        launch_qm(kernel, p, nbh, 0, stream, dev);
      };
      if (D <= 64) {
        launch(&qk_generic_kernel<TT_, 2>);
      } else if (D <= 128) {
        launch(&qk_generic_kernel<TT_, 4>);
      } else {
        launch(&qk_generic_kernel<TT_, 8>);
      }
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor qmatmul_values(const at::Tensor& p_in, const at::Tensor& codes_in, const at::Tensor& scale_in,
                          const at::Tensor& zero_in, int64_t bits, int64_t G) {
  check_bits_group(bits, G);
  check_packed(codes_in, scale_in, zero_in);
  const int64_t B = codes_in.size(0), Hkv = codes_in.size(1), T = codes_in.size(2), P = 8 / bits;
  const int64_t D = codes_in.size(3) * P;
  KIVI_CHECK(D % G == 0 && scale_in.size(0) == B && scale_in.size(1) == Hkv && scale_in.size(2) == T &&
                  scale_in.size(3) == D / G,
              "kivi: codes ", codes_in.sizes(), " hold head_dim ", D, " at ", bits, " bits, so scale/zero must be [", B,
              ", ", Hkv, ", ", T, ", ", D / G, "] for group_size ", G, ", got ", scale_in.sizes());
  check_query(p_in, "p", codes_in, scale_in, B, Hkv);
  KIVI_CHECK(p_in.size(3) == T, "kivi: p's last dimension (", p_in.size(3), ") must be the token count (", T, ")");
  KIVI_CHECK(D >= 1 && D <= 256, "kivi: the CUDA qmatmul_values supports head_dim up to 256, got ", D);
  const int64_t Hq = p_in.size(1), M = p_in.size(2), R = (Hq / Hkv) * M;
  const c10::cuda::CUDAGuard guard(p_in.device());
  const int dev = p_in.get_device();
  auto out = at::empty({B, Hq, M, D}, p_in.options());
  if (out.numel() == 0) return out;
  if (T == 0) return out.zero_();
  check_fits_int32(T, "token count");
  check_fits_int32(B * Hkv * R, "batch * heads * query rows");
  const auto pm = p_in.contiguous();
  const auto codes = rows_contiguous(codes_in), scale = rows_contiguous(scale_in), zero = rows_contiguous(zero_in);
  const auto dtype = pm.scalar_type();
  QMParams p = make_params(pm, out, codes, scale, zero, R, D, G, bits, T);
  const int64_t nbh = head_blocks(p);
  const bool fast = tensor_core_shape(dtype, bits, D, G) && aligned_view(codes, 1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor ws;
  auto alloc_ws = [&]() {
    if (p.n_splits > 1) {
      ws = at::empty({B * Hkv * R, p.n_splits, D}, pm.options().dtype(at::kFloat));
      p.ws = ws.mutable_data_ptr<float>();
    }
  };
  if (fast) {
    auto launch = [&](auto tT, auto vB, auto dD) {
      using TT_ = typename decltype(tT)::type;
      constexpr int VB = decltype(vB)::value, DD = decltype(dD)::value;
      const auto kernel = &pv_fast_kernel<TT_, VB, DD>;
      const size_t smem = Geo<2, VB, DD, false, true>::BLOCK_BYTES;
      const int ntiles = ceil_div(T, TT);
      const int min_tps = env_int("KIVI_QM_MIN_TPS");
      plan_fast_splits(p, ntiles, ntiles, nbh, reinterpret_cast<const void*>(kernel), smem, dev,
                       min_tps > 0 ? min_tps : kMinValueTilesPerSplit);
      alloc_ws();
      launch_qm(kernel, p, nbh, smem, stream, dev);
    };
    dispatch_tc_dtype(dtype, [&](auto tT) {
      dispatch_tc_bits(bits, [&](auto vB) { dispatch_tc_dim(D, [&](auto dD) { launch(tT, vB, dD); }); });
    });
  } else {
    dispatch_float(dtype, "qmatmul_values", [&](auto tag) {
      using TT_ = typename decltype(tag)::type;
      auto launch = [&](auto kernel) {
        const size_t smem = static_cast<size_t>(WARPS * ROWS * D * 4);
        const int want = splits_wanted(reinterpret_cast<const void*>(kernel), smem, dev, nbh);
        p.chunk = std::max(16, ceil_div(T, want));
        p.n_splits = ceil_div(T, p.chunk);
        alloc_ws();
        launch_qm(kernel, p, nbh, smem, stream, dev);
      };
      if (D <= 64) {
        launch(&pv_generic_kernel<TT_, 2>);
      } else if (D <= 128) {
        launch(&pv_generic_kernel<TT_, 4>);
      } else {
        launch(&pv_generic_kernel<TT_, 8>);
      }
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.n_splits > 1) {
    launch_split_combine<false>(dtype, p.ws, nullptr, p.out, B * Hkv * R, p.n_splits, D, stream, dev);
  }
  return out;
}

}  // namespace
}  // namespace kivi::cuda

TORCH_LIBRARY_IMPL(kivi, CUDA, m) {
  m.impl("qmatmul_keys", &kivi::cuda::qmatmul_keys);
  m.impl("qmatmul_values", &kivi::cuda::qmatmul_values);
}
