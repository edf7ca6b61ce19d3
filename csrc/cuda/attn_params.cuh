// The parameters of decode attention's kernels (decode_attention.cu) and the per-sequence helpers
// every path shares: a token's mask bit and a sequence's length.
// Included by decode_attention.cu alone, in its anonymous namespace (internal linkage, as there).
#pragma once

#include "kv_tile.cuh"

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

// One (batch, KV head)'s cache tensors: packed codes, scales and zeros, and the residuals.
template <typename T>
struct HeadCache {
  const uint8_t* kc;
  const T *ks, *kz;
  const uint8_t* vc;
  const T *vs, *vz, *kr, *vr;
};

template <typename T>
__device__ __forceinline__ HeadCache<T> head_cache(const AttnParams& p, int b, int h) {
  return {at_head<uint8_t>(p.kc, b, h), at_head<T>(p.ks, b, h), at_head<T>(p.kz, b, h), at_head<uint8_t>(p.vc, b, h),
          at_head<T>(p.vs, b, h),       at_head<T>(p.vz, b, h), at_head<T>(p.kr, b, h), at_head<T>(p.vr, b, h)};
}

}  // namespace
}  // namespace kivi::cuda
