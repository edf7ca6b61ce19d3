// Tensor-core tiles over a packed KIVI cache, shared by decode attention and the Q_MatMul kernels.
// Layout: kivi_ops/ops/layout.py. See docs/cuda_kernels.md for the design and the byte counts.
//
// A block (4 warps, 128 threads) owns one KV head and up to ROWS = 8 query rows (the n_rep * M rows
// of that head, or a chunk of them), so every byte of the cache is read once for all its query
// heads. Each warp streams its own tiles of TT = 64 tokens through a STAGES-deep cp.async ring in
// shared memory (Geo's NST; decode attention's long 4-bit calls use one stage, split-phase: see
// has_one_stage_ring in attn_fast.cuh, ring_stages_for in decode_attention.cu), with no block
// barriers in the main loop, and computes with mma.sync m16n8k16 (fp16 or bf16 operands, fp32
// accumulators), the query rows in the n = 8 dimension:
//
//   keys   S^T[token, row] = sum_d  codes[token, d] * (q[row, d] * s[g, d])  +  sum_d q[row, d] z[g, d]
//          A = codes (16 tokens x 16 channels, unpacked exactly to fp16/bf16 in registers; fp16 as
//          subnormals, common.cuh's unpack2_codes, the power of two taken off each score),
//          B = Q' = q * s of the current key group (rebuilt when the group changes), split into
//          Q'hi = round(q * s) and Q'lo = round(q * s - Q'hi): two mma per k-step on the same A,
//          so the product is kept exactly (a single rounded Q' costs ~2^-12 relative per term,
//          too much next to an outlier key channel: see docs/cuda_kernels.md); blocks of at most
//          4 rows put both halves in one mma's columns (key_scores' PAIRED),
//          C starts at QZ[g, row] = q . z_g, precomputed for the block's groups by one mma pass.
//   values O^T[d, row] += sum_t codes[t, d] * (p[row, t] * s[t, g(d)])  +  z[t, g(d)] * p[row, t]
//          A = codes (16 channels x 16 tokens), B = P' = p * s per 32-channel block,
//          the zero term is one more mma per 32-channel block with A = ones, B = p * z.
//
// The fragment layouts of the codes follow the packed layout (no transposes): a key code row (P
// tokens x D channels) gives each lane 16-byte chunks whose 4-byte words hold 4 channels x P
// tokens; the k (channel) order inside an mma is permuted to match, and Q' is built in the same
// permuted order. A value token row gives each lane byte 8*bb + gid of every 8-byte block (one
// byte = P channels of one token), and two tokens' bytes are paired with one PRMT.
#pragma once

#include "common.cuh"
#include "../tensor_rows.h"

namespace kivi::cuda::tile {

constexpr int TT = 64;            // tokens per tile
constexpr int WARPS = 4;          // warps per block
constexpr int THREADS = 32 * WARPS;
constexpr int ROWS = 8;           // query rows per block (the mma's n)
constexpr int STAGES = 2;         // cp.async ring depth per warp (the default; decode attention picks its own)
constexpr int PS = TT / 2 + 4;    // pbuf row stride in 32-bit words (pairs of tokens), padded
constexpr int QZ_MAX = 256;       // key groups per block in the q.z table (multiple of 16): up to 127 tiles at G = 32
constexpr unsigned kFull = 0xffffffffu;

template <int N, typename F, int... I>
__device__ __forceinline__ void static_for_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
// f(integral_constant<int, 0>) ... f(integral_constant<int, N-1>)
template <int N, typename F>
__device__ __forceinline__ void static_for(F&& f) {
  static_for_impl<N>(f, std::make_integer_sequence<int, N>{});
}

// One cache tensor [B, H, rows, cols] whose rows (dims 2, 3) are contiguous; element strides of
// the batch and head dims (a slice of a larger static cache stays a view, no copy).
struct View {
  const void* p;
  int64_t sB, sH;
};

template <typename E>
__device__ __forceinline__ const E* at_head(const View& v, int b, int h) {
  return static_cast<const E*>(v.p) + b * v.sB + h * v.sH;
}

// Compile-time dispatch of the tensor-core paths (the caller has checked their conditions):
// f(Tag<__half>) or f(Tag<__nv_bfloat16>); f(integral_constant<int, 2 or 4>); f(integral_constant<int, 64 or 128>).
template <typename F>
void dispatch_tc_dtype(at::ScalarType st, F&& f) {
  if (st == at::kHalf) {
    f(Tag<__half>{});
  } else {
    f(Tag<__nv_bfloat16>{});
  }
}

template <typename F>
void dispatch_tc_bits(int64_t bits, F&& f) {
  if (bits == 2) {
    f(std::integral_constant<int, 2>{});
  } else {
    f(std::integral_constant<int, 4>{});
  }
}

template <typename F>
void dispatch_tc_dim(int64_t D, F&& f) {
  if (D == 64) {
    f(std::integral_constant<int, 64>{});
  } else {
    f(std::integral_constant<int, 128>{});
  }
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

inline View view_of(const at::Tensor& t) { return View{t.const_data_ptr(), t.stride(0), t.stride(1)}; }

// 16-byte aligned base, batch and head strides (the fast kernels' cp.async needs it).
inline bool aligned_view(const at::Tensor& t, int64_t esz) {
  auto ok = [&](int dim) { return t.size(dim) <= 1 || (t.stride(dim) * esz) % 16 == 0; };
  return aligned16(t.const_data_ptr()) && ok(0) && ok(1);
}

// Whether the decode loop's copies of the value scales vs and zeros vz ([B, H, T, NG] each, rows
// contiguous), when each head streams its first `tokens` tokens, stay inside each tensor's storage.
// WarpTileCopies copies each tile's scale/zero run in whole 16-byte chunks from the boundary at or
// below its first byte: where a head's rows start off a boundary (a view), the last chunk reads up to
// 15 bytes past the run. Those bytes are never used and cannot fault (the granule shares the run's
// page), but past the storage's end they are not the tensor's, and memcheck with the caching
// allocator off reports them. Cutting the last chunk exactly in the loop cost 12-21 instructions per
// tile (SASS); the hosts check here.
#ifndef KIVI_GRANULE_CHECK
#define KIVI_GRANULE_CHECK 1  // 0: no check (A/B of the memcheck that finds the over-read)
#endif
inline bool vsz_reads_in_storage(const at::Tensor& vs, const at::Tensor& vz, int64_t tokens) {
  auto in_storage = [tokens](const at::Tensor& t) {
    if (t.numel() == 0) return true;
    const int64_t last_head = (t.size(0) - 1) * t.stride(0) + (t.size(1) - 1) * t.stride(1);  // its first element
    const auto first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    const uintptr_t read_end = (first + (last_head + tokens * t.size(3)) * t.element_size() + 15) & ~uintptr_t(15);
    const auto storage_beg = reinterpret_cast<uintptr_t>(t.storage().data());
    return (first & ~uintptr_t(15)) >= storage_beg && read_end <= storage_beg + t.storage().nbytes();
  };
  return !KIVI_GRANULE_CHECK || tokens == 0 || (in_storage(vs) && in_storage(vz));
}

// Shared-memory geometry of the fast kernels. HAS_K / HAS_V: which half of the cache is staged;
// NST: ring stages per warp.
template <int KB, int VB, int D, bool HAS_K, bool HAS_V, int NST = STAGES>
struct Geo {
  static_assert(D == 64 || D == 128, "fast path head_dim");
  static constexpr int PK = 8 / KB, PV = 8 / VB;
  static constexpr int NKS = D / 16;      // key k-steps (16 channels each)
  static constexpr int NKB = D / 64;      // 16-byte chunks per lane per key code row
  static constexpr int KROWS = TT / PK;   // key code rows per tile
  static constexpr int RSETS = TT / (8 * PK);  // row-sets of 8 code rows per tile
  static constexpr int MPR = PK / 2;      // key m-tiles (16 tokens) per row-set
  static constexpr int NMT = TT / 16;     // key m-tiles per tile
  static constexpr int RB = D * VB / 8;   // value code bytes per token
  // value code rows in shared memory: padded by 16 bytes (when 2+ chunks) so that the byte loads of
  // a warp (rows 2c + const, bytes 8bb + gid) fall in distinct banks
  static constexpr int RS = RB >= 32 ? RB + 16 : RB;
  static constexpr int NVM = D / 16;      // value m-tiles (16 channels)
  static constexpr int NBB = D * VB / 64; // 8-byte blocks per value token row
  static constexpr int NCB = D / 32;      // 32-channel blocks (one value group or less)
  static constexpr int VKS = TT / 16;     // value k-steps (16 tokens)

  static constexpr int KC_BYTES = HAS_K ? KROWS * D : 0;
  static constexpr int KS_BYTES = HAS_K ? (TT / 32) * D * 2 : 0;  // up to TT/32 scale rows (G >= 32)
  static constexpr int VC_BYTES = HAS_V ? TT * RS : 0;
  static constexpr int VSZ_BYTES = HAS_V ? (TT * NCB * 2 + 16 + 15) / 16 * 16 : 0;  // aligned superset
  static constexpr int OFF_KC = 0;
  static constexpr int OFF_KS = OFF_KC + KC_BYTES;
  static constexpr int OFF_VC = OFF_KS + KS_BYTES;
  static constexpr int OFF_VS = OFF_VC + VC_BYTES;
  static constexpr int OFF_VZ = OFF_VS + VSZ_BYTES;
  static constexpr int STAGE_BYTES = OFF_VZ + VSZ_BYTES;

  static constexpr int SPV_BYTES = HAS_V ? (TT / 2) * NCB * 4 : 0;  // [token pair][32-ch block] pairs
  static_assert(NST == 1 || NST == 2, "ring stages");
  static constexpr int NSTAGES = NST;
  static constexpr int OFF_SPS = NST * STAGE_BYTES;
  static constexpr int OFF_SPZ = OFF_SPS + SPV_BYTES;
  static constexpr int OFF_PB = OFF_SPZ + SPV_BYTES;
  static constexpr int WARP_BYTES = OFF_PB + ROWS * PS * 4;

  static constexpr int QPS = 2 * NKS + 4;  // q words per (row, lane%4), padded against bank conflicts
  static constexpr int QP_BYTES = HAS_K ? ROWS * 4 * QPS * 4 : 0;
  static constexpr int QZ_BYTES = HAS_K ? QZ_MAX * ROWS * 4 : 0;
  static constexpr int OFF_QP = 0;
  static constexpr int OFF_QZ = OFF_QP + QP_BYTES;
  static constexpr int OFF_W = OFF_QZ + QZ_BYTES;
  static constexpr int EPI_BYTES = WARPS * ROWS * D * 4 + 2 * WARPS * ROWS * 4;  // block combine
  static constexpr int BLOCK_BYTES =
      (OFF_W + WARPS * WARP_BYTES) > EPI_BYTES ? (OFF_W + WARPS * WARP_BYTES) : EPI_BYTES;

  static_assert(KC_BYTES % 16 == 0 && KS_BYTES % 16 == 0 && VC_BYTES % 16 == 0 && VSZ_BYTES % 16 == 0, "align");
  static_assert(WARP_BYTES % 16 == 0 && OFF_W % 16 == 0, "align");

  // Key code rows: 16-byte chunk c of row r sits at chunk c ^ ksw(r) (bank-conflict-free LDS.128:
  // the 8 lanes of a phase read rows 2i, 2i+1 at the same chunks). Rows 8*rs + gid: ksw(gid).
  __device__ static __forceinline__ int ksw(int r) { return D >= 128 ? ((r & 1) << 2) : 0; }
};

// ------------------------------------------------------------------------------------------------
// Staging (one warp; cp.async, committed by the caller)
// ------------------------------------------------------------------------------------------------

// Key code rows [t0/PK, t0/PK + KROWS) and scale rows [t0/G, ...) of tokens [t0, t0 + valid), G = 2^log2G;
// chunks past `valid` are zero-filled. Lane l copies chunks l + 32 i: a fixed row/chunk pattern
// per lane, so every address is a per-lane base plus a compile-time offset.
template <class GEO, int D>
__device__ __forceinline__ void stage_keys(unsigned char* st, const uint8_t* kc, const unsigned char* ks, int t0,
                                           int valid, int log2G, int lane) {
  const int G = 1 << log2G;
  constexpr int CPR = D / 16, RPI = 32 / CPR;  // chunks per row, rows per iteration
  static_assert((GEO::KROWS * CPR) % 32 == 0, "whole iterations");
  const uint8_t* src = kc + static_cast<int64_t>(t0 / GEO::PK) * D + lane * 16;
  const int r_l = lane / CPR, cc_l = lane % CPR;
  const uint32_t dst = smem_u32(st + GEO::OFF_KC + r_l * D + ((cc_l ^ GEO::ksw(r_l)) << 4));
  const int rows_valid = (valid + GEO::PK - 1) / GEO::PK;
#pragma unroll
  for (int i = 0; i < GEO::KROWS * CPR / 32; ++i) {
    const bool ok = r_l + i * RPI < rows_valid;
    cp_async16(dst + i * RPI * D, ok ? src + i * 512 : src, ok ? 16 : 0);
  }
  constexpr int KS_CHUNKS = GEO::KS_BYTES / 16;  // capacity: TT/32 rows
  const int nks = TT >= G ? TT / G : 1;
  const int n = min(nks, (valid + G - 1) >> log2G) * (D * 2 / 16);
  const unsigned char* ssrc = ks + static_cast<int64_t>(t0 >> log2G) * D * 2 + lane * 16;
  const uint32_t sdst = smem_u32(st + GEO::OFF_KS + lane * 16);
#pragma unroll
  for (int i = 0; i < (KS_CHUNKS + 31) / 32; ++i) {
    if (lane + 32 * i < nks * (D * 2 / 16)) {
      const bool ok = lane + 32 * i < n;
      cp_async16(sdst + i * 512, ok ? ssrc + i * 512 : ssrc, ok ? 16 : 0);
    }
  }
}

// Value code rows [t0, t0 + TT) (rows >= valid zero-filled; row t at t * RS), and the scale/zero
// elements of tokens [t0, t0 + valid), copied in 16-byte chunks from the 16-byte boundary at or
// below their first byte (their rows need not be 16-byte aligned: D/G elements per token), the
// last chunk cut at their last byte (plain loads: no byte past it is touched). Element (t, g) then
// sits at byte
// OFF_VS + ((vs + (t0 + t) * NG * 2) & 15) + (t * NG + g) * 2 of the stage.
template <class GEO, int D>
__device__ __forceinline__ void stage_values(unsigned char* st, const uint8_t* vc, const unsigned char* vs,
                                             const unsigned char* vz, int t0, int valid, int NG, int lane) {
  constexpr int RB = GEO::RB, RS = GEO::RS, CPR = RB / 16, RPI = 32 / CPR;
  static_assert((TT * CPR) % 32 == 0, "whole iterations");
  const uint8_t* src = vc + static_cast<int64_t>(t0) * RB + lane * 16;
  const int t_l = lane / CPR, cc_l = lane % CPR;
  const uint32_t dst = smem_u32(st + GEO::OFF_VC + t_l * RS + cc_l * 16);
#pragma unroll
  for (int i = 0; i < TT * CPR / 32; ++i) {
    const bool ok = t_l + i * RPI < valid;
    cp_async16(dst + i * RPI * RS, ok ? src + i * 512 : src, ok ? 16 : 0);
  }
  const int64_t nbytes = static_cast<int64_t>(valid) * NG * 2;
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    const unsigned char* base = (which == 0 ? vs : vz) + static_cast<int64_t>(t0) * NG * 2;
    const unsigned char* end = base + nbytes;
    // the aligned chunk holding `base` starts at most 15 bytes before it (never before the
    // allocation, which is 16-byte aligned); the last chunk copies only up to `end`
    const unsigned char* a0 = reinterpret_cast<const unsigned char*>(reinterpret_cast<uintptr_t>(base) & ~uintptr_t(15));
    const int n = static_cast<int>((end - a0 + 15) >> 4);
    unsigned char* d0 = st + (which == 0 ? GEO::OFF_VS : GEO::OFF_VZ) + lane * 16;
#pragma unroll
    for (int i = 0; i < GEO::VSZ_BYTES / 16 / 32 + 1; ++i) {
      const int c = lane + 32 * i;
      if (c < n) {
        const unsigned char* src = a0 + c * 16;
        if (end - src >= 16) {
          cp_async16(smem_u32(d0 + i * 512), src);
        } else {  // the run's last, partial chunk, in 2-byte loads: compute-sanitizer's memcheck
          // counts a cut cp.async (src-size < 16) as reading all 16 bytes, and these may pass the
          // end of the tensor's storage (the tail or a Q_MatMul tile of its last head)
          for (int b = 0; b < end - src; b += 2)
            *reinterpret_cast<uint16_t*>(d0 + i * 512 + b) = *reinterpret_cast<const uint16_t*>(src + b);
        }
      }
    }
  }
}

// The copies of one warp's full tiles (TT tokens each), for the decode loop: the warp's tiles are
// WARPS * TT tokens apart, so each source advances by a fixed stride from one tile to the next, and
// the per-lane copy plan (the scale/zero rows' skew against 16 bytes, their chunk count, the last
// chunk's size) is the same for every tile: t0 * NG * 2 is a multiple of 16. stage_keys/stage_values
// work all of it out per tile from the head's base and t0, in 64-bit arithmetic that ptxas
// rematerializes at the register cap: ~150 of the 2/2 loop's 1327 instructions per tile (SASS).
// Here the sources are warp-uniform pointers (with a warp index that ptxas knows to be uniform, they
// live in uniform registers) that keys() and values() stage and then advance.
template <class GEO, int D>
struct WarpTileCopies {
  const uint8_t* kc;        // the next tile's key code rows
  const unsigned char* ks;  // its key scale rows
  const uint8_t* vc;        // its value code rows
  const unsigned char* vsz[2];  // its value scales / zeros, rounded down to 16 bytes
  int ks_step;              // key scale bytes from one of the warp's tiles to the next: (WARPS * TT / G) * D * 2
  int vsz_len;              // bytes of a tile's scale / zero run
  uint32_t lane_plan;       // this lane's chunks that not every lane has: bit 0 a key scale chunk,
                            // bits 1 + 2w + i: chunk lane + 32 i of the scales (w = 0) / zeros (w = 1)

  // t0: the warp's first tile; vs, vz: the head's value scales and zeros. A scale/zero run is copied
  // in whole 16-byte chunks from the boundary at or below its first byte: the last chunk may read up
  // to 15 bytes past the run, inside the same 16-byte granule as the run's last byte, and those bytes
  // are never used. The hosts make sure that granule is in the tensor's storage (vsz_reads_in_storage).
  __device__ __forceinline__ WarpTileCopies(const uint8_t* kc_h, const unsigned char* ks_h, const uint8_t* vc_h,
                                            const unsigned char* vs_h, const unsigned char* vz_h, int t0, int log2G,
                                            int NG, int ks_step_, int lane) {
    kc = kc_h + static_cast<int64_t>(t0 / GEO::PK) * D;
    ks = ks_h + static_cast<int64_t>(t0 >> log2G) * D * 2;
    vc = vc_h + static_cast<int64_t>(t0) * GEO::RB;
    ks_step = ks_step_;
    vsz_len = TT * NG * 2;
    const int nks = TT >= (1 << log2G) ? TT >> log2G : 1;
    static_assert(GEO::KS_BYTES / 16 <= 32, "one key scale chunk per lane");
    static_assert(GEO::VSZ_BYTES / 16 <= 64, "two scale/zero chunks per lane");
    lane_plan = lane < nks * (D * 2 / 16) ? 1u : 0u;
    const unsigned char* src[2] = {vs_h, vz_h};
#pragma unroll
    for (int w = 0; w < 2; ++w) {
      const unsigned char* run = src[w] + static_cast<int64_t>(t0) * NG * 2;
      const int skew = static_cast<int>(reinterpret_cast<uintptr_t>(run) & 15);  // the same for every tile
      vsz[w] = run - skew;
      const int chunks = (skew + vsz_len + 15) >> 4;
      if (lane < chunks) lane_plan |= 2u << (2 * w);
      if (lane + 32 < chunks) lane_plan |= 4u << (2 * w);
    }
    // held, not worked out again from the head's pointers in each tile: ptxas, at the register cap,
    // rematerializes whatever it can recompute (~40 instructions per tile here), but not a shuffle
    lane_plan = __shfl_sync(0xffffffffu, lane_plan, lane);
  }

  // Stages the next tile's key codes and scales into st, then moves on to the warp's next tile.
  __device__ __forceinline__ void keys(unsigned char* st, int lane) {
    constexpr int CPR = D / 16, RPI = 32 / CPR;
    static_assert((GEO::KROWS * CPR) % 32 == 0, "whole iterations");
    const int r_l = lane / CPR, cc_l = lane % CPR;
    const uint32_t dst = smem_u32(st + GEO::OFF_KC + r_l * D + ((cc_l ^ GEO::ksw(r_l)) << 4));
#pragma unroll
    for (int i = 0; i < GEO::KROWS * CPR / 32; ++i) cp_async16(dst + i * RPI * D, kc + lane * 16 + i * 512);
    if (lane_plan & 1u) cp_async16(smem_u32(st + GEO::OFF_KS + lane * 16), ks + lane * 16);
    kc += WARPS * GEO::KROWS * D;
    ks += ks_step;
  }

  // Stages the next tile's value codes, scales and zeros into st, then moves on.
  __device__ __forceinline__ void values(unsigned char* st, int lane) {
    constexpr int RB = GEO::RB, RS = GEO::RS, CPR = RB / 16, RPI = 32 / CPR;
    static_assert((TT * CPR) % 32 == 0, "whole iterations");
    const int t_l = lane / CPR, cc_l = lane % CPR;
    const uint32_t dst = smem_u32(st + GEO::OFF_VC + t_l * RS + cc_l * 16);
#pragma unroll
    for (int i = 0; i < TT * CPR / 32; ++i) cp_async16(dst + i * RPI * RS, vc + lane * 16 + i * 512);
    vc += WARPS * TT * RB;
#pragma unroll
    for (int w = 0; w < 2; ++w) {
      const uint32_t d0 = smem_u32(st + (w == 0 ? GEO::OFF_VS : GEO::OFF_VZ) + lane * 16);
      if (lane_plan & (2u << (2 * w))) cp_async16(d0, vsz[w] + lane * 16);
      if (lane_plan & (4u << (2 * w))) cp_async16(d0 + 512, vsz[w] + lane * 16 + 512);
      vsz[w] += WARPS * vsz_len;
    }
  }
};

// [token pair][32-channel block] pairs (s[2tp][g], s[2tp+1][g]) of the staged scales and zeros,
// g = the group of the block; tokens >= valid give 0. Element (t, g) sits at element t * NG + g of
// the staged run (soff / zoff bytes past its 16-byte boundary). Lane l fills pairs e = l + 32 i:
// block cb = l % NCB and group g are the same in every i, so with NG a compile-time constant every
// load is a per-lane base plus an immediate (a run-time NG cost ~100 instructions per tile, SASS).
// NARROW (value_accum_narrow's order): a token pair's NCB entries go in slot order h * NCB/2 + j for
// block cb = 2j + h (j: the 64-channel segment, h: its half), so that one lane's blocks, one per
// segment, are adjacent.
template <int NCB>
__device__ __forceinline__ int narrow_slot(int cb) {
  return NCB == 4 ? (cb & 1) * 2 + (cb >> 1) : cb;
}

template <class GEO, int NG, bool NARROW = false>
__device__ __forceinline__ void transpose_vsz_ng(const unsigned char* st, uint32_t* sps, uint32_t* spz, int soff,
                                                 int zoff, int valid, int lane) {
  constexpr int NCB = GEO::NCB, TPI = 32 / NCB;  // token pairs per iteration
  constexpr int G = GEO::NCB * 32 / NG;          // NG = D / G
  const int cb = lane % NCB, tp = lane / NCB, g = cb * 32 / G;
  const int slot = NARROW ? tp * NCB + narrow_slot<NCB>(cb) : lane;
  const uint16_t* sb = reinterpret_cast<const uint16_t*>(st + GEO::OFF_VS + soff) + 2 * tp * NG + g;
  const uint16_t* zb = reinterpret_cast<const uint16_t*>(st + GEO::OFF_VZ + zoff) + 2 * tp * NG + g;
#pragma unroll
  for (int i = 0; i < (TT / 2) * NCB / 32; ++i) {
    const int t = 2 * (tp + i * TPI), o = 2 * i * TPI * NG;
    const uint32_t s0 = t < valid ? sb[o] : 0u, s1 = t + 1 < valid ? sb[o + NG] : 0u;
    const uint32_t z0 = t < valid ? zb[o] : 0u, z1 = t + 1 < valid ? zb[o + NG] : 0u;
    sps[slot + 32 * i] = s0 | (s1 << 16);
    spz[slot + 32 * i] = z0 | (z1 << 16);
  }
}

// The same with NG a run-time value: one copy of the code, for Q_MatMul's value kernel (its
// register cap has no room for three copies: ptxas spills at bf16, 4 bits, D = 64).
template <class GEO>
__device__ __forceinline__ void transpose_vsz_any(const unsigned char* st, uint32_t* sps, uint32_t* spz, int soff,
                                                  int zoff, int NG, int log2G, int valid, int lane) {
  constexpr int NCB = GEO::NCB;
  const uint16_t* sb = reinterpret_cast<const uint16_t*>(st + GEO::OFF_VS + soff);
  const uint16_t* zb = reinterpret_cast<const uint16_t*>(st + GEO::OFF_VZ + zoff);
#pragma unroll
  for (int e = lane; e < (TT / 2) * NCB; e += 32) {
    const int tp = e / NCB, cb = e % NCB, g = (cb << 5) >> log2G, t = 2 * tp;
    const uint32_t s0 = t < valid ? sb[t * NG + g] : 0u, s1 = t + 1 < valid ? sb[(t + 1) * NG + g] : 0u;
    const uint32_t z0 = t < valid ? zb[t * NG + g] : 0u, z1 = t + 1 < valid ? zb[(t + 1) * NG + g] : 0u;
    sps[e] = s0 | (s1 << 16);
    spz[e] = z0 | (z1 << 16);
  }
}

// NG = D / G of the fast paths (G = 32, 64, 128; D % G == 0 for values)
template <class GEO, bool NARROW = false>
__device__ __forceinline__ void transpose_vsz(const unsigned char* st, uint32_t* sps, uint32_t* spz, int soff,
                                              int zoff, int NG, int valid, int lane) {
  if (NG == GEO::NCB) {
    transpose_vsz_ng<GEO, GEO::NCB, NARROW>(st, sps, spz, soff, zoff, valid, lane);
  } else if (NG == GEO::NCB / 2) {
    transpose_vsz_ng<GEO, GEO::NCB / 2, NARROW>(st, sps, spz, soff, zoff, valid, lane);
  } else if constexpr (GEO::NCB >= 4) {
    transpose_vsz_ng<GEO, GEO::NCB / 4, NARROW>(st, sps, spz, soff, zoff, valid, lane);
  }
}

// ------------------------------------------------------------------------------------------------
// Query preparation (block-wide)
// ------------------------------------------------------------------------------------------------

// q rows in the permuted pair order of the key B fragments: for row r, lane%4 = c, k-step
// ks = 4*kb + i, the channels of code word i of chunk c + 4*kb are ch = 16*(c + 4*kb) + 4*i + e,
// e = 0..3, and the pairs are (e0, e2) then (e1, e3). Rows >= nrows are zero.
template <typename T, int D, int QPS>
__device__ __forceinline__ void fill_qperm(uint32_t* qperm, const T* qh, int nrows) {
  constexpr int NKS = D / 16;
  for (int e = threadIdx.x; e < ROWS * 4 * NKS; e += THREADS) {
    const int r = e / (4 * NKS), rem = e % (4 * NKS), c = rem / NKS, ks = rem % NKS;
    const int ch = 16 * (c + 4 * (ks / 4)) + 4 * (ks % 4);
    uint32_t p02 = 0, p13 = 0;
    if (r < nrows) {
      const uint2 v = *reinterpret_cast<const uint2*>(qh + static_cast<int64_t>(r) * D + ch);
      p02 = __byte_perm(v.x, v.y, 0x5410);
      p13 = __byte_perm(v.x, v.y, 0x7632);
    }
    qperm[(r * 4 + c) * QPS + 2 * ks] = p02;
    qperm[(r * 4 + c) * QPS + 2 * ks + 1] = p13;
  }
}

// qz[(g - gA) * ROWS + r] = sum_d z[g, d] * q[r, d] for the ng groups from gA, fp32 accumulation of
// exact products: one m16n8k16 mma per 8 groups and k-step, A = the q rows (m; rows 8-15 zero),
// B = the zero rows of 8 groups (n). The k order is permuted so that a lane's channels are one
// contiguous slice, [D/4 * tid, +D/4): k-step ks takes channels D/4 * tid + 4 * ks + {0, 1}
// (k 2tid, 2tid+1) and + {2, 3} (k 2tid+8, +9) in A and B alike, and each row is 16-byte loads.
// A warp loads the zero rows of QZ_BATCH 8-group blocks before any mma (8 * QZ_BATCH * WARPS = 64
// groups a round). The rows of later rounds (more than 32 tiles at G = 32: the long 4-bit splits)
// are first requested into L2 by the whole block, so their round waits on L2, not on DRAM again.
// (The prologue before, a 16-group block at a time, is kept at 70236b9 as -DKIVI_QZ_VEC=0: the
// A/B of benchmarks/results/2026-11-30-h200-70236b9.)
constexpr int QZ_BATCH = 2;  // 3 or more: the 4-bit one-stage kernels spill at their 168-register cap

// The 16-byte chunks of a lane's slice of one row (NW / 4 of them) as NW words: word w holds
// channels c0 + 2w, c0 + 2w + 1 (all zero where !valid).
template <typename T, int NW>
__device__ __forceinline__ void load_slice(uint32_t (&w)[NW], const T* src, bool valid) {
#pragma unroll
  for (int i = 0; i < NW / 4; ++i) {
    const uint4 v = valid ? *reinterpret_cast<const uint4*>(src + 8 * i) : make_uint4(0u, 0u, 0u, 0u);
    w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
  }
}

// qz[g * ROWS + r] = zs * (q[r] . z_{gA + g}): zs is the scale the scores are wanted in (decode: the
// softmax scale in log2 units; key_scores adds the table to its scaled sums)
template <typename T, int D>
__device__ __forceinline__ void qz_prologue(float* qz, const T* kz, const T* qh, int nrows, int gA, int ng, int warp,
                                            int lane, float zs) {
  constexpr int NKS = D / 16, NW = D / 8;  // NW: 32-bit words of a lane's D/4 channels
  const int gid = lane >> 2, tid = lane & 3;
  const int nb = (ng + 7) / 8, c0 = (D / 4) * tid;
  constexpr int ROUND = 8 * QZ_BATCH * WARPS, LINES = D * 2 / 128;  // groups a round; 128-byte lines a row
  for (int i = threadIdx.x; i < (ng - ROUND) * LINES; i += THREADS) {
    prefetch_l2(kz + static_cast<int64_t>(gA + ROUND + i / LINES) * D + (i % LINES) * 64);
  }
  uint32_t qw[NW];
  load_slice<T, NW>(qw, qh + static_cast<int64_t>(gid) * D + c0, gid < nrows);
  for (int b0 = warp; b0 < nb; b0 += QZ_BATCH * WARPS) {
    uint32_t zw[QZ_BATCH][NW];  // block b0 + j * WARPS: group 8 * block + gid
#pragma unroll
    for (int j = 0; j < QZ_BATCH; ++j) {
      const int g = 8 * (b0 + j * WARPS) + gid;
      load_slice<T, NW>(zw[j], kz + static_cast<int64_t>(gA + g) * D + c0, g < ng);
    }
#pragma unroll
    for (int j = 0; j < QZ_BATCH; ++j) {
      const int bj = b0 + j * WARPS;
      if (bj < nb) {
        float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int ks = 0; ks < NKS; ++ks) mma16816<T>(c, qw[2 * ks], 0u, qw[2 * ks + 1], 0u, zw[j][2 * ks], zw[j][2 * ks + 1]);
        qz[(8 * bj + 2 * tid) * ROWS + gid] = c[0] * zs;  // c[0], c[1]: query row gid, groups 8 bj + 2 tid, + 1
        qz[(8 * bj + 2 * tid + 1) * ROWS + gid] = c[1] * zs;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Keys: scores of one staged tile
// ------------------------------------------------------------------------------------------------

// S[mt][0..3] for key m-tile mt = rs * MPR + h: c0/c1 = token tau, rows 2c/2c+1; c2/c3 = token
// tau + 1, where tau = (8 * rs + gid) * PK + 2 * h is the token's index in the tile (even).
// qp: Q' of the current key group, qp[ks][0..1] the B fragment of Q'hi, qp[ks][2..3] of Q'lo, built
// anew in each tile: kept across tiles it held 32 registers through the softmax and value phase for
// nothing (a warp's next tile starts WARPS * TT tokens on, in another key group unless G > WARPS * TT,
// where the rebuild is merely redundant). qz: the block's q.z table from gA, already times sc
// (qz_prologue's zs): S comes out times sc.
// zrow: the first of the lane's two query rows (2 * (lane & 3)), or with PAIRED its one row.
// PAIRED (decode blocks of at most 4 query rows: MHA, GQA 4:1, M <= 4): column 2r carries Q'hi and
// column 2r + 1 Q'lo of row r, so one mma per k-step gives both halves (lane tid: c0 + c1, c2 +
// c3 = row tid's scores), against two mmas with the halves in separate ones. Column g's B operand
// is fma(qa, s, -round(qb * s)) with qa, qb the rows qperm_mine and qperm_b point at: (q, 0) gives
// Q'hi, (q, q) Q'lo. Row tid's scores go to S[mt][0] and S[mt][2] and, copied, to S[mt][1] and
// S[mt][3]; a row past the block's (zero in qperm) comes out as 0, finite and never used.
template <typename T, class GEO, int KB, int D, bool PAIRED = false>
__device__ __forceinline__ void key_scores(const unsigned char* st, int t0, int log2G, const uint32_t* qperm_mine,
                                           const float* qz, int gA, float sc, float (&S)[GEO::NMT][4], int lane,
                                           int zrow, const uint32_t* qperm_b = nullptr) {
  constexpr int PK = GEO::PK, MPR = GEO::MPR, NKB = GEO::NKB, QW = PAIRED ? 2 : 4;
  const int gid = lane >> 2, tid = lane & 3;
  const int tile_g0 = t0 >> log2G;
  uint32_t qp[D / 16][QW];
  int cur_g = -1;
#pragma unroll
  for (int rs = 0; rs < GEO::RSETS; ++rs) {
    const int g = (t0 + rs * 8 * PK) >> log2G;
    if (rs == 0 || g != cur_g) {  // warp-uniform: rebuild Q' = q * s for group g
      const T* srow = reinterpret_cast<const T*>(st + GEO::OFF_KS) + (g - tile_g0) * D;
#pragma unroll
      for (int kb = 0; kb < NKB; ++kb) {
        const uint4 sa = *reinterpret_cast<const uint4*>(srow + 16 * (tid + 4 * kb));
        const uint4 sb = *reinterpret_cast<const uint4*>(srow + 16 * (tid + 4 * kb) + 8);
        const uint4 qa = *reinterpret_cast<const uint4*>(qperm_mine + 8 * kb);
        const uint4 qb = *reinterpret_cast<const uint4*>(qperm_mine + 8 * kb + 4);
        const uint32_t sw[8] = {sa.x, sa.y, sa.z, sa.w, sb.x, sb.y, sb.z, sb.w};
        const uint32_t qw[8] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
        uint32_t qv[8];  // PAIRED: the lane's qb row
        if constexpr (PAIRED) {
          const uint4 va = *reinterpret_cast<const uint4*>(qperm_b + 8 * kb);
          const uint4 vb = *reinterpret_cast<const uint4*>(qperm_b + 8 * kb + 4);
          qv[0] = va.x, qv[1] = va.y, qv[2] = va.z, qv[3] = va.w, qv[4] = vb.x, qv[5] = vb.y, qv[6] = vb.z, qv[7] = vb.w;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint32_t s02 = __byte_perm(sw[2 * i], sw[2 * i + 1], 0x5410);
          const uint32_t s13 = __byte_perm(sw[2 * i], sw[2 * i + 1], 0x7632);
          if constexpr (PAIRED) {
            qp[4 * kb + i][0] = hfma2_negc<T>(qw[2 * i], s02, hmul2<T>(qv[2 * i], s02));
            qp[4 * kb + i][1] = hfma2_negc<T>(qw[2 * i + 1], s13, hmul2<T>(qv[2 * i + 1], s13));
          } else {
            const uint32_t h0 = hmul2<T>(qw[2 * i], s02), h1 = hmul2<T>(qw[2 * i + 1], s13);
            qp[4 * kb + i][0] = h0;
            qp[4 * kb + i][1] = h1;
            qp[4 * kb + i][2] = hfma2_negc<T>(qw[2 * i], s02, h0);
            qp[4 * kb + i][3] = hfma2_negc<T>(qw[2 * i + 1], s13, h1);
          }
        }
      }
      cur_g = g;
    }
    // q.z of rows zrow, zrow + 1 (PAIRED: z.x only; no 8-byte load, zrow may be odd)
    const float2 z = PAIRED ? make_float2(qz[(g - gA) * ROWS + zrow], 0.f)
                            : *reinterpret_cast<const float2*>(qz + (g - gA) * ROWS + zrow);
    uint32_t cw[NKB][4];
#pragma unroll
    for (int kb = 0; kb < NKB; ++kb) {
      // row 8*rs + gid (ksw(8*rs + gid) = ksw(gid)), chunk tid + 4*kb
      const uint4 v = *reinterpret_cast<const uint4*>(st + GEO::OFF_KC + gid * D + (((tid + 4 * kb) ^ GEO::ksw(gid)) << 4) +
                                                      rs * 8 * D);
      cw[kb][0] = v.x;
      cw[kb][1] = v.y;
      cw[kb][2] = v.z;
      cw[kb][3] = v.w;
    }
    // independent accumulators (Q'hi / Q'lo, each m-tile of the row-set): 2*MPR mma chains from zero;
    // their sum is unscaled by the codes' power of two and by sc, and q.z added, in one fma per score
    float chi[MPR][4], clo[MPR][4];
    static_for<MPR>([&](auto H) {
      constexpr int h = decltype(H)::value;
      chi[h][0] = chi[h][1] = chi[h][2] = chi[h][3] = 0.f;
      if constexpr (!PAIRED) clo[h][0] = clo[h][1] = clo[h][2] = clo[h][3] = 0.f;
    });
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const uint32_t w = cw[ks / 4][ks % 4];
      const uint32_t w8 = w >> 8;
      static_for<MPR>([&](auto H) {
        constexpr int h = decltype(H)::value;
        const uint32_t a0 = unpack2_codes<T, KB, 2 * h, true>(w), a1 = unpack2_codes<T, KB, 2 * h + 1, true>(w);
        const uint32_t a2 = unpack2_codes<T, KB, 2 * h, true>(w8), a3 = unpack2_codes<T, KB, 2 * h + 1, true>(w8);
        mma16816<T>(chi[h], a0, a1, a2, a3, qp[ks][0], qp[ks][1]);
        if constexpr (!PAIRED) mma16816<T>(clo[h], a0, a1, a2, a3, qp[ks][2], qp[ks][3]);
      });
    }
    static_for<MPR>([&](auto H) {  // c0, c1: token tau (field 2h); c2, c3: tau + 1 (field 2h + 1)
      constexpr int h = decltype(H)::value;
      const float f0 = codes_unscale<T, KB, 2 * h, true>() * sc, f1 = codes_unscale<T, KB, 2 * h + 1, true>() * sc;
      float* s = S[rs * MPR + h];
      if constexpr (PAIRED) {  // columns 2 tid, 2 tid + 1: hi and lo of row tid
        s[0] = s[1] = fmaf(chi[h][0] + chi[h][1], f0, z.x);
        s[2] = s[3] = fmaf(chi[h][2] + chi[h][3], f1, z.x);
      } else {
        s[0] = fmaf(chi[h][0] + clo[h][0], f0, z.x);
        s[1] = fmaf(chi[h][1] + clo[h][1], f0, z.y);
        s[2] = fmaf(chi[h][2] + clo[h][2], f1, z.x);
        s[3] = fmaf(chi[h][3] + clo[h][3], f1, z.y);
      }
    });
  }
}

// Token index in the tile of S[mt][c] (c = 0..3).
template <class GEO>
__device__ __forceinline__ int score_token(int mt, int c, int gid) {
  const int rs = mt / GEO::MPR, h = mt % GEO::MPR;
  return (8 * rs + gid) * GEO::PK + 2 * h + (c >> 1);
}

// Write scores (or probabilities) as pairs of T: pb[row * PS + tau / 2] = (x[tau], x[tau + 1]).
// PAIRED (key_scores' layout of at most 4 rows): lane tid writes its one row tid, rows 4-7 untouched.
template <typename T, class GEO, bool PAIRED = false>
__device__ __forceinline__ void write_pairs(uint32_t* pb, const float (&S)[GEO::NMT][4], int lane) {
  const int gid = lane >> 2, tid = lane & 3;
#pragma unroll
  for (int mt = 0; mt < GEO::NMT; ++mt) {
    const int pair = score_token<GEO>(mt, 0, gid) / 2;
    if constexpr (PAIRED) {
      pb[tid * PS + pair] = pack2<T>(S[mt][0], S[mt][2]);
    } else {
      pb[(2 * tid) * PS + pair] = pack2<T>(S[mt][0], S[mt][2]);
      pb[(2 * tid + 1) * PS + pair] = pack2<T>(S[mt][1], S[mt][3]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Values: accumulate one staged tile
// ------------------------------------------------------------------------------------------------

// Whether value_accum takes the ldmatrix path: 4-bit values. KIVI_VALUE_LDMATRIX=0 at build time:
// the byte loads everywhere (A/B; docs/perf_plan.md, "Session 11"); KIVI_VALUE_LDMATRIX=2: the byte
// loads beside 2-bit keys in the one-stage ring, where ldmatrix once spilled (A/B, "Session 22").
#ifndef KIVI_VALUE_LDMATRIX
#define KIVI_VALUE_LDMATRIX 1
#endif
template <class GEO>
constexpr bool value_ldmatrix() {
  return GEO::PV == 2 && KIVI_VALUE_LDMATRIX != 0 &&
         !(KIVI_VALUE_LDMATRIX == 2 && GEO::PK == 4 && GEO::NSTAGES == 1);
}

// The pair (1, 1) in T: the A operand of the value zero term's mma (every channel of a block).
template <typename T>
constexpr uint32_t ones2() {
  return std::is_same_v<T, __half> ? 0x3C003C00u : 0x3F803F80u;
}

// The scale and zero pairs of token pairs tp0 and tp1 (tokens 2tp, 2tp + 1), one per 32-channel
// block, from transpose_vsz's tables: two vector loads each.
template <int NCB>
__device__ __forceinline__ void load_vsz_pairs(const uint32_t* sps, const uint32_t* spz, int tp0, int tp1,
                                               uint32_t (&s0)[NCB], uint32_t (&s1)[NCB], uint32_t (&z0)[NCB],
                                               uint32_t (&z1)[NCB]) {
  if constexpr (NCB == 4) {
    const uint4 a = *reinterpret_cast<const uint4*>(sps + tp0 * NCB), b = *reinterpret_cast<const uint4*>(sps + tp1 * NCB);
    const uint4 c = *reinterpret_cast<const uint4*>(spz + tp0 * NCB), d = *reinterpret_cast<const uint4*>(spz + tp1 * NCB);
    s0[0] = a.x; s0[1] = a.y; s0[2] = a.z; s0[3] = a.w;
    s1[0] = b.x; s1[1] = b.y; s1[2] = b.z; s1[3] = b.w;
    z0[0] = c.x; z0[1] = c.y; z0[2] = c.z; z0[3] = c.w;
    z1[0] = d.x; z1[1] = d.y; z1[2] = d.z; z1[3] = d.w;
  } else {
    const uint2 a = *reinterpret_cast<const uint2*>(sps + tp0 * NCB), b = *reinterpret_cast<const uint2*>(sps + tp1 * NCB);
    const uint2 c = *reinterpret_cast<const uint2*>(spz + tp0 * NCB), d = *reinterpret_cast<const uint2*>(spz + tp1 * NCB);
    s0[0] = a.x; s0[1] = a.y;
    s1[0] = b.x; s1[1] = b.y;
    z0[0] = c.x; z0[1] = c.y;
    z1[0] = d.x; z1[1] = d.y;
  }
}

// acc[mt]: value m-tile mt covers channel ch0 = value_channel(mt, gid) (d0, d1: rows 2c, 2c+1)
// and ch0 + 1 (d2, d3); zacc[cb]: the zero term of 32-channel block cb (d0, d1 = rows 2c, 2c+1,
// identical for every channel of the block), from B = p * z rounded to T. (One mma per k-step with
// A = the z pairs and B = p, exact products, was measured further from the reference at 128k:
// the tensor core truncates the 22-bit products to the large accumulator's quantum, always toward
// zero; docs/perf_plan.md, "Session 20".) pb: [row][token pair] pairs of p.
// An A fragment register pairs two tokens' codes of the same channels (k = tokens), while the
// cache packs a token's channels into its bytes. Byte path: four byte loads and two PRMT give
// a lane byte 8*bb + gid of four token rows. ldmatrix path (4 bits): a 16-byte row segment is
// 32 channels, one scale block, and one ldmatrix.x4.trans gives each lane bytes 2gid, 2gid+1 of
// tokens 2tid, 2tid+1 (and +8, +9) in two segments; per tile 8 LDSM instead of 128 byte loads and
// ~60 PRMT. At 2 bits a segment is 64 channels, two scale blocks at G = 32, which one m-tile's
// shared B operand (P * s) cannot serve: 2 bits keep the byte path here, and decode blocks of at
// most 4 query rows take value_accum_narrow, which puts the two blocks' scales in the B columns.
template <typename T, class GEO, int VB, int D, bool DEQUANT>
__device__ __forceinline__ void value_accum_tile(const unsigned char* st, const uint32_t* sps, const uint32_t* spz,
                                                 const uint32_t* pb, float (&acc)[D / 16][4],
                                                 float (&zacc)[D / 32][4], int lane) {
  constexpr int PV = GEO::PV, NCB = GEO::NCB, RS = GEO::RS;
  const int gid = lane >> 2, tid = lane & 3;
  // byte 8*bb + gid of token row 16*ks + 2*tid + dt: a per-lane base plus a compile-time offset
  const unsigned char* vbase = st + GEO::OFF_VC + 2 * tid * RS + gid;
  auto vbyte = [&](int ks, int dt, int bb) -> uint32_t { return vbase[(16 * ks + dt) * RS + 8 * bb]; };
  // ldmatrix rows (4 bits): lane l gives token row (l & 7) + 8 ((l >> 3) & 1), segment l >> 4
  const uint32_t vrows = smem_u32(st + GEO::OFF_VC + ((lane & 7) + 8 * ((lane >> 3) & 1)) * RS + 16 * (lane >> 4));
#pragma unroll
  for (int ks = 0; ks < GEO::VKS; ++ks) {
    const int tp0 = 8 * ks + tid, tp1 = tp0 + 4;
    const uint32_t p0 = pb[gid * PS + tp0], p1 = pb[gid * PS + tp1];
    uint32_t s0[NCB], s1[NCB], z0[NCB], z1[NCB];
    load_vsz_pairs<NCB>(sps, spz, tp0, tp1, s0, s1, z0, z1);
    uint32_t pp0[NCB], pp1[NCB];
    if constexpr (!DEQUANT) {
#pragma unroll
      for (int cb = 0; cb < NCB; ++cb) {
        pp0[cb] = hmul2<T>(p0, s0[cb]);
        pp1[cb] = hmul2<T>(p1, s1[cb]);
        // zero term: A = ones (every channel of the block), B = p * z
        mma16816<T>(zacc[cb], ones2<T>(), ones2<T>(), ones2<T>(), ones2<T>(), hmul2<T>(p0, z0[cb]), hmul2<T>(p1, z1[cb]));
      }
    }
    // one m-tile: code pairs xlo (tokens 2tid, 2tid+1) and xhi (2tid+8, 2tid+9), fields F0 (rows
    // gid) and F1 (rows gid + 8), all in 32-channel block cb
    auto mma_codes = [&](float (&d)[4], uint32_t xlo, uint32_t xhi, auto F0, auto F1, int cb) {
      constexpr int f0 = decltype(F0)::value, f1 = decltype(F1)::value;
      if constexpr (DEQUANT) {
        mma16816<T>(d, hfma2<T>(unpack2<T, VB, f0>(xlo), s0[cb], z0[cb]), hfma2<T>(unpack2<T, VB, f1>(xlo), s0[cb], z0[cb]),
                    hfma2<T>(unpack2<T, VB, f0>(xhi), s1[cb], z1[cb]), hfma2<T>(unpack2<T, VB, f1>(xhi), s1[cb], z1[cb]),
                    p0, p1);
      } else {
        mma16816<T>(d, unpack2_codes<T, VB, f0, false>(xlo), unpack2_codes<T, VB, f1, false>(xlo),
                    unpack2_codes<T, VB, f0, false>(xhi), unpack2_codes<T, VB, f1, false>(xhi), pp0[cb], pp1[cb]);
      }
    };
    if constexpr (value_ldmatrix<GEO>()) {
      // segments 2sp, 2sp + 1 (32-channel blocks): d[2j] tokens 2tid, 2tid+1 and d[2j+1] tokens
      // 2tid+8, 2tid+9 of segment 2sp + j; byte 2gid + b of a segment holds channels 4gid + 2b, +1
      static_for<NCB / 2>([&](auto SP) {
        constexpr int sp = decltype(SP)::value;
        uint32_t d[4];
        ldmatrix_x4_trans(d, vrows + 16 * ks * RS + 32 * sp);
        static_for<4>([&](auto I) {
          constexpr int j = decltype(I)::value / 2, b = decltype(I)::value % 2, sg = 2 * sp + j;
          mma_codes(acc[2 * sg + b], d[2 * j] >> (8 * b), d[2 * j + 1] >> (8 * b), std::integral_constant<int, 0>{},
                    std::integral_constant<int, 1>{}, sg);
        });
      });
    } else {
#pragma unroll
      for (int bb = 0; bb < GEO::NBB; ++bb) {
        const uint32_t xlo = __byte_perm(vbyte(ks, 0, bb), vbyte(ks, 1, bb), 0x5410);
        const uint32_t xhi = __byte_perm(vbyte(ks, 8, bb), vbyte(ks, 9, bb), 0x5410);
        static_for<PV / 2>([&](auto H) {
          constexpr int h = decltype(H)::value;
          mma_codes(acc[bb * (PV / 2) + h], xlo, xhi, std::integral_constant<int, 2 * h>{},
                    std::integral_constant<int, 2 * h + 1>{}, bb * PV / 4);
        });
      }
    }
  }
}

template <typename T, class GEO, int VB, int D>
__device__ __forceinline__ void value_accum(const unsigned char* st, const uint32_t* sps, const uint32_t* spz,
                                            const uint32_t* pb, float (&acc)[D / 16][4], float (&zacc)[D / 32][4],
                                            int lane) {
  value_accum_tile<T, GEO, VB, D, false>(st, sps, spz, pb, acc, zacc, lane);
}

// Q_MatMul's value tile: A = the dequantized values v = code * s + z (exact codes, then one fma per
// pair, rounded once, as dequantize_values rounds them), B = p as given, so every product p * v is
// exact in the fp32 accumulator. value_accum's B = p * s loses Q_MatMul's p: a softmax over T tokens
// is ~1/T, and p * s falls below fp16's normal range (2^-14) from ~16k tokens, where it keeps fewer
// bits (measured against the fp16 matmul: relative error 2.6-2.9e-3 at 32k tokens and 4 bits, 7e-4 at
// 4k; a numpy model at 128k: 1e-2), and its zero term p * z cancels against the code term. Decode
// attention keeps value_accum: its p is exp2(score - running max), 1 at the largest score.
// Cost per pair of codes: unpack2 (LOP3 + HFMA2) and this HFMA2, against value_accum's one LOP3
// (fp16 subnormal codes), less its P' products and zero-term mma. acc[mt] as in value_accum, unscaled.
template <typename T, class GEO, int VB, int D>
__device__ __forceinline__ void value_accum_dequant(const unsigned char* st, const uint32_t* sps, const uint32_t* spz,
                                                    const uint32_t* pb, float (&acc)[D / 16][4], int lane) {
  float unused[D / 32][4];  // no zero term
  value_accum_tile<T, GEO, VB, D, true>(st, sps, spz, pb, acc, unused, lane);
}

// 2-bit values for blocks of at most 4 query rows (decode: MHA, or GQA 4:1). The mma's n = 8 columns
// then hold the rows twice: column c is query row c & 3 with the scales of block 2j + (c >> 2) of the
// 64-channel segment j, and an m-tile may mix a segment's two 32-channel blocks. So a 16-byte row
// segment (64 channels at 2 bits) can come through ldmatrix as at 4 bits: one ldmatrix.x4.trans per
// 16 tokens gives each lane bytes 2gid, 2gid+1 (channels 8gid .. 8gid+7) of tokens 2tid, 2tid+1 (and
// +8, +9) of both segments, in place of 16 byte loads and 8 PRMT; P' and the zero term take one
// HMUL2 pair and one mma per segment instead of one per block. A lane's outputs are its own block's
// where tid >> 1 == gid >> 2 (write_warp_acc_narrow); the others are discarded. The caller rescales
// a lane's columns by the factors of rows 2 (tid & 1) and 2 (tid & 1) + 1.
// sps/spz: transpose_vsz's NARROW order. acc[4j + 2b + h]: channels value_channel_narrow; zacc[j].
template <typename T, class GEO, int D>
__device__ __forceinline__ void value_accum_narrow(const unsigned char* st, const uint32_t* sps, const uint32_t* spz,
                                                   const uint32_t* pb, float (&acc)[D / 16][4],
                                                   float (&zacc)[D / 32][4], int lane) {
  static_assert(GEO::PV == 4, "2-bit values");
  constexpr int NCB = GEO::NCB, RS = GEO::RS, NSEG = D / 64;  // 64-channel row segments (16 bytes)
  const int gid = lane >> 2, tid = lane & 3;
  // ldmatrix rows: lane l gives token row (l & 7) + 8 ((l >> 3) & 1) of segment l >> 4 (D = 64: one
  // segment, which lanes 16-31 give again)
  const uint32_t vrows =
      smem_u32(st + GEO::OFF_VC + ((lane & 7) + 8 * ((lane >> 3) & 1)) * RS + 16 * ((lane >> 4) % NSEG));
  const uint32_t* pb_row = pb + (gid & 3) * PS;
  const uint32_t* sp = sps + (gid >> 2) * NSEG;  // this lane's column block in each segment
  const uint32_t* zp = spz + (gid >> 2) * NSEG;
#pragma unroll
  for (int ks = 0; ks < GEO::VKS; ++ks) {
    const int tp0 = 8 * ks + tid, tp1 = tp0 + 4;
    const uint32_t p0 = pb_row[tp0], p1 = pb_row[tp1];
    uint32_t s0[NSEG], s1[NSEG], z0[NSEG], z1[NSEG];
    if constexpr (NSEG == 2) {
      const uint2 a = *reinterpret_cast<const uint2*>(sp + tp0 * NCB), b = *reinterpret_cast<const uint2*>(sp + tp1 * NCB);
      const uint2 c = *reinterpret_cast<const uint2*>(zp + tp0 * NCB), d = *reinterpret_cast<const uint2*>(zp + tp1 * NCB);
      s0[0] = a.x; s0[1] = a.y; s1[0] = b.x; s1[1] = b.y;
      z0[0] = c.x; z0[1] = c.y; z1[0] = d.x; z1[1] = d.y;
    } else {
      s0[0] = sp[tp0 * NCB]; s1[0] = sp[tp1 * NCB];
      z0[0] = zp[tp0 * NCB]; z1[0] = zp[tp1 * NCB];
    }
    uint32_t d[4];
    ldmatrix_x4_trans(d, vrows + 16 * ks * RS);
    static_for<NSEG>([&](auto J) {
      constexpr int j = decltype(J)::value;
      const uint32_t pp0 = hmul2<T>(p0, s0[j]), pp1 = hmul2<T>(p1, s1[j]);
      mma16816<T>(zacc[j], ones2<T>(), ones2<T>(), ones2<T>(), ones2<T>(), hmul2<T>(p0, z0[j]), hmul2<T>(p1, z1[j]));
      static_for<4>([&](auto I) {  // byte b of the lane's pair, fields 2h and 2h + 1
        constexpr int b = decltype(I)::value / 2, h = decltype(I)::value % 2;
        const uint32_t xlo = d[2 * j] >> (8 * b), xhi = d[2 * j + 1] >> (8 * b);
        mma16816<T>(acc[4 * j + 2 * b + h], unpack2_codes<T, 2, 2 * h, false>(xlo),
                    unpack2_codes<T, 2, 2 * h + 1, false>(xlo), unpack2_codes<T, 2, 2 * h, false>(xhi),
                    unpack2_codes<T, 2, 2 * h + 1, false>(xhi), pp0, pp1);
      });
    });
  }
}

// Channel of value_accum_narrow's acc[mt][0] (row gid of m-tile mt = 4j + 2b + h; acc[mt][2]: the next).
__device__ __forceinline__ int value_channel_narrow(int mt, int gid) {
  return 64 * (mt / 4) + 8 * gid + 4 * ((mt / 2) % 2) + 2 * (mt % 2);
}

// value_accum_narrow's sums into red as write_warp_acc does: only the lanes whose columns are their own
// block's (tid >> 1 == gid >> 2), for query rows 2 (tid & 1) and 2 (tid & 1) + 1.
template <typename T, int D>
__device__ __forceinline__ void write_warp_acc_narrow(float* red, int warp, const float (&acc)[D / 16][4],
                                                      const float (&zacc)[D / 32][4], int lane) {
  const int gid = lane >> 2, tid = lane & 3;
  if ((tid >> 1) != (gid >> 2)) return;
  const int r0 = 2 * (tid & 1);
  static_for<D / 16>([&](auto MT) {
    constexpr int mt = decltype(MT)::value, j = mt / 4, h = mt % 2;
    constexpr float f0 = codes_unscale<T, 2, 2 * h, false>(), f1 = codes_unscale<T, 2, 2 * h + 1, false>();
    float* row = red + (warp * ROWS + r0) * D + value_channel_narrow(mt, gid);
    *reinterpret_cast<float2*>(row) = make_float2(fmaf(acc[mt][0], f0, zacc[j][0]), fmaf(acc[mt][2], f1, zacc[j][0]));
    *reinterpret_cast<float2*>(row + D) = make_float2(fmaf(acc[mt][1], f0, zacc[j][1]), fmaf(acc[mt][3], f1, zacc[j][1]));
  });
}

// Channel of acc[mt][0] (acc[mt][2] is the next channel).
template <class GEO>
__device__ __forceinline__ int value_channel(int mt, int gid) {
  if constexpr (value_ldmatrix<GEO>()) return 32 * (mt / 2) + 4 * gid + 2 * (mt % 2);  // ldmatrix layout
  const int bb = mt / (GEO::PV / 2), h = mt % (GEO::PV / 2);
  return (8 * bb + gid) * GEO::PV + 2 * h;
}

// value_accum_dequant's acc into the block's sum buffer red [WARPS][ROWS][D] (float32): query row
// 2tid gets d0 (channel ch) and d2 (ch + 1), row 2tid + 1 gets d1 and d3.
template <class GEO, int D>
__device__ __forceinline__ void write_warp_values(float* red, int warp, const float (&acc)[D / 16][4], int lane) {
  const int gid = lane >> 2, tid = lane & 3;
  static_for<D / 16>([&](auto MT) {
    constexpr int mt = decltype(MT)::value;
    float* r0 = red + (warp * ROWS + 2 * tid) * D + value_channel<GEO>(mt, gid);
    *reinterpret_cast<float2*>(r0) = make_float2(acc[mt][0], acc[mt][2]);
    *reinterpret_cast<float2*>(r0 + D) = make_float2(acc[mt][1], acc[mt][3]);
  });
}

// Per-warp results into the block-combine buffers: red[(warp*ROWS + r)*D + d] = acc + zero term,
// acc unscaled by its channels' code fields (unpack2_codes: ch is field 2h, ch + 1 field 2h + 1).
template <typename T, class GEO, int D>
__device__ __forceinline__ void write_warp_acc(float* red, int warp, const float (&acc)[D / 16][4],
                                               const float (&zacc)[D / 32][4], int lane) {
  constexpr int VB = 8 / GEO::PV;
  const int gid = lane >> 2, tid = lane & 3;
  static_for<D / 16>([&](auto MT) {
    constexpr int mt = decltype(MT)::value, h = mt % (GEO::PV / 2);
    constexpr float f0 = codes_unscale<T, VB, 2 * h, false>(), f1 = codes_unscale<T, VB, 2 * h + 1, false>();
    const int ch = value_channel<GEO>(mt, gid);
    const int cbk = (mt / (GEO::PV / 2)) * GEO::PV / 4;  // 32-channel block of ch (compile-time)
    float* r0 = red + (warp * ROWS + 2 * tid) * D + ch;
    float* r1 = red + (warp * ROWS + 2 * tid + 1) * D + ch;
    *reinterpret_cast<float2*>(r0) = make_float2(fmaf(acc[mt][0], f0, zacc[cbk][0]), fmaf(acc[mt][2], f1, zacc[cbk][0]));
    *reinterpret_cast<float2*>(r1) = make_float2(fmaf(acc[mt][1], f0, zacc[cbk][1]), fmaf(acc[mt][3], f1, zacc[cbk][1]));
  });
}

// ------------------------------------------------------------------------------------------------
// Generic (scalar) element loaders, any bits / group size / head_dim: the tails and fallbacks.
// ------------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float key_elem(const uint8_t* kc, const T* ks, const T* kz, int t, int d, int D, int kbits,
                                          int G) {
  const int PK = 8 / kbits;
  const uint32_t code = (kc[static_cast<int64_t>(t / PK) * D + d] >> ((t % PK) * kbits)) & ((1u << kbits) - 1u);
  const int64_t gi = static_cast<int64_t>(t / G) * D + d;
  return dequant(code, to_f(ks[gi]), to_f(kz[gi]));
}

template <typename T>
__device__ __forceinline__ float value_elem(const uint8_t* vc, const T* vs, const T* vz, int t, int d, int D,
                                            int vbits, int G) {
  const int PV = 8 / vbits, NG = D / G;
  const uint32_t code = (vc[static_cast<int64_t>(t) * (D / PV) + d / PV] >> ((d % PV) * vbits)) & ((1u << vbits) - 1u);
  const int64_t gi = static_cast<int64_t>(t) * NG + d / G;
  return dequant(code, to_f(vs[gi]), to_f(vz[gi]));
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

}  // namespace kivi::cuda::tile
