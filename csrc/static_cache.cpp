// Static KIVI cache: fixed-shape state that lives inside preallocated "store" tensors, updated in
// place by a mutating op, so a compiled decode step has static shapes (CUDA graphs) and needs no
// Python (AOTInductor). Both ops are CompositeExplicitAutograd kernels made of ATen ops and calls
// to the kivi::(de)quantize_* ops through the dispatcher, so ONE implementation serves every
// device that those ops serve (CPU, CUDA).
//
// A store is a contiguous [B, H, L, Ds] tensor of the cache dtype: L is the maximum length. Ds is
// the head_dim D for a transformers StaticCache buffer (reinterpreted), or fewer for a compact
// store (StaticKIVICache, KIVIStaticCache: ~D/3.5 at 2 bits) whose bytes are all the state needs;
// D itself comes from the new tokens. Its bytes hold, one region after another, each region a
// contiguous [B, H, ...] tensor (layout of the codes: kivi_ops/ops/layout.py):
//
//   key store    ring  [B,H,R,D] dtype        full-precision keys, position p in slot p % R
//                scale [B,H,NG,D] dtype       NG = ceil(L/G) + 1 groups (one spare, see append)
//                zero  [B,H,NG,D] dtype
//                codes [B,H,NG*G/P,D] uint8   per-channel key codes (P = 8 / k_bits)
//   value store  ring  [B,H,R,D] dtype        full-precision values, position p in slot p % R
//                scale [B,H,L,D/G] dtype
//                zero  [B,H,L,D/G] dtype
//                codes [B,H,L,D/P] uint8      per-token value codes
//
// No counter is stored: every call receives `pos`, the int64 positions n .. n+M-1 of its M new
// tokens, as a device tensor (transformers' cache_position; StaticKIVICache keeps the count on the
// device too). Which tokens are quantized follows from n alone (KIVI streaming, DESIGN §1):
// keys at positions < floor(n/R)*R are read from codes, later ones from the ring; values at
// positions < max(n-R, 0) from codes, later ones from the ring. So nothing branches on n on the
// host: the decode step has no host sync and can be captured in a CUDA graph.
//
// Codes are written eagerly (a value's codes at its own row as it arrives; a key group's codes
// recomputed each time a token of that group arrives) and read only once the streaming rule says
// the token is quantized; this gives exactly KIVI's codes (a group's codes depend only on its G
// tokens) with fixed-size writes instead of data-dependent flushes.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "check.h"

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <optional>
#include <vector>
#include <tuple>

namespace kivi::static_cache {
namespace {

using Packed = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }

struct KeyState {
  at::Tensor ring, scale, zero, codes;
};
struct ValueState {
  at::Tensor ring, scale, zero, codes;
};

void check_args(const at::Tensor& store, int64_t bits, int64_t G, int64_t R, const char* name) {
  KIVI_CHECK(store.dim() == 4, "kivi: ", name, " must be a 4-D [B, H, L, D] store, got ", store.dim(), "-D");
  KIVI_CHECK(store.is_contiguous(), "kivi: ", name, " must be contiguous");
  KIVI_CHECK(bits == 2 || bits == 4 || bits == 8, "kivi: bits must be 2, 4 or 8, got ", bits);
  KIVI_CHECK(G > 0 && G % 8 == 0, "kivi: group_size must be a positive multiple of 8, got ", G);
  KIVI_CHECK(R > 0 && R % G == 0, "kivi: residual_length (", R, ") must be a positive multiple of group_size (", G,
              ")");
}

// Bytes each region needs (same formulas as kivi_ops/cache/static_ops.py: store_nbytes).
int64_t key_nbytes(int64_t B, int64_t H, int64_t L, int64_t D, int64_t es, int64_t bits, int64_t G, int64_t R) {
  const int64_t NG = (L + G - 1) / G + 1;
  return align16(B * H * R * D * es) + 2 * align16(B * H * NG * D * es) + align16(B * H * NG * G * bits / 8 * D);
}
int64_t value_nbytes(int64_t B, int64_t H, int64_t L, int64_t D, int64_t es, int64_t bits, int64_t G, int64_t R) {
  return align16(B * H * R * D * es) + 2 * align16(B * H * L * (D / G) * es) + align16(B * H * L * D * bits / 8);
}

// Carves `nbytes` at `off` out of the store's bytes as a contiguous tensor of `dtype` and `shape`.
at::Tensor carve(const at::Tensor& bytes, int64_t& off, at::ScalarType dtype, at::IntArrayRef shape) {
  int64_t numel = 1;
  for (auto s : shape) numel *= s;
  const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  at::Tensor t = bytes.narrow(0, off, nbytes).view(dtype).view(shape);
  off += align16(nbytes);
  return t;
}

at::Tensor store_bytes(const at::Tensor& store) { return store.view({-1}).view(at::kByte); }

KeyState key_state(const at::Tensor& store, int64_t D, int64_t bits, int64_t G, int64_t R) {
  check_args(store, bits, G, R, "k_store");
  const int64_t B = store.size(0), H = store.size(1), L = store.size(2);
  const int64_t es = store.element_size(), NG = (L + G - 1) / G + 1;
  KIVI_CHECK(key_nbytes(B, H, L, D, es, bits, G, R) <= store.numel() * es, "kivi: k_store ", store.sizes(),
              " is too small for KIVI key state of head_dim ", D, " with residual_length ", R, " (needs ",
              key_nbytes(B, H, L, D, es, bits, G, R), " bytes, has ", store.numel() * es,
              "; a full-width store's max length must be ~1.25 R or more)");
  auto bytes = store_bytes(store);
  int64_t off = 0;
  KeyState s;
  s.ring = carve(bytes, off, store.scalar_type(), {B, H, R, D});
  s.scale = carve(bytes, off, store.scalar_type(), {B, H, NG, D});
  s.zero = carve(bytes, off, store.scalar_type(), {B, H, NG, D});
  s.codes = carve(bytes, off, at::kByte, {B, H, NG * G * bits / 8, D});
  return s;
}

ValueState value_state(const at::Tensor& store, int64_t D, int64_t bits, int64_t G, int64_t R) {
  check_args(store, bits, G, R, "v_store");
  const int64_t B = store.size(0), H = store.size(1), L = store.size(2);
  const int64_t es = store.element_size();
  KIVI_CHECK(D % G == 0, "kivi: head_dim (", D, ") must be a multiple of group_size (", G, ")");
  KIVI_CHECK(value_nbytes(B, H, L, D, es, bits, G, R) <= store.numel() * es, "kivi: v_store ", store.sizes(),
              " is too small for KIVI value state of head_dim ", D, " with residual_length ", R, " (needs ",
              value_nbytes(B, H, L, D, es, bits, G, R), " bytes, has ", store.numel() * es, ")");
  auto bytes = store_bytes(store);
  int64_t off = 0;
  ValueState s;
  s.ring = carve(bytes, off, store.scalar_type(), {B, H, R, D});
  s.scale = carve(bytes, off, store.scalar_type(), {B, H, L, D / G});
  s.zero = carve(bytes, off, store.scalar_type(), {B, H, L, D / G});
  s.codes = carve(bytes, off, at::kByte, {B, H, L, D * bits / 8});
  return s;
}

// Typed handles to the kivi ops: dispatching through them picks the CPU or CUDA kernel.
Packed quantize(const char* name, const at::Tensor& x, int64_t bits, int64_t G) {
  static auto keys = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("kivi::quantize_keys", "")
                         .typed<Packed(const at::Tensor&, int64_t, int64_t)>();
  static auto values = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("kivi::quantize_values", "")
                           .typed<Packed(const at::Tensor&, int64_t, int64_t)>();
  return (name[0] == 'k' ? keys : values).call(x, bits, G);
}

at::Tensor dequantize(const char* name, const at::Tensor& c, const at::Tensor& s, const at::Tensor& z, int64_t bits,
                      int64_t G) {
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t);
  static auto keys = c10::Dispatcher::singleton().findSchemaOrThrow("kivi::dequantize_keys", "").typed<Sig>();
  static auto values = c10::Dispatcher::singleton().findSchemaOrThrow("kivi::dequantize_values", "").typed<Sig>();
  return (name[0] == 'k' ? keys : values).call(c, s, z, bits, G);
}

at::Tensor qmatmul(const char* name, const at::Tensor& x, const at::Tensor& c, const at::Tensor& s, const at::Tensor& z,
                   int64_t bits, int64_t G) {
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t);
  static auto keys = c10::Dispatcher::singleton().findSchemaOrThrow("kivi::qmatmul_keys", "").typed<Sig>();
  static auto values = c10::Dispatcher::singleton().findSchemaOrThrow("kivi::qmatmul_values", "").typed<Sig>();
  return (name[0] == 'k' ? keys : values).call(x, c, s, z, bits, G);
}

void check_new(const at::Tensor& store, const at::Tensor& x, const at::Tensor& pos, const char* name) {
  // head_dim may differ from the store's last dim (compact stores); key_state/value_state check the bytes
  KIVI_CHECK(x.dim() == 4 && x.size(0) == store.size(0) && x.size(1) == store.size(1),
              "kivi: ", name, " must be [B, H, M, D] with its store's B and H ", store.sizes(), ", got ", x.sizes());
  KIVI_CHECK(pos.dim() == 1 && pos.size(0) == x.size(2) && pos.scalar_type() == at::kLong,
              "kivi: pos must be an int64 [M] tensor of the new tokens' positions, got ", pos.scalar_type(), " ",
              pos.sizes());
}

// Writes the last min(M, R) new tokens into ring slots pos % R (distinct slots; earlier new
// tokens, if M > R, are quantized already and never read from the ring).
void write_ring(const at::Tensor& ring, const at::Tensor& x, const at::Tensor& pos, int64_t R) {
  const int64_t M = x.size(2), keep = std::min(M, R);
  ring.index_copy_(2, at::remainder(pos.narrow(0, M - keep, keep), R), x.narrow(2, M - keep, keep));
}

// One new token on CUDA: kivi::_static_append_one_ (csrc/cuda/static_append.cu) writes the same
// bytes as the composite below in one kernel instead of ~25 small ones. KIVI_STATIC_APPEND_COMPOSITE=1
// keeps the composite (tests compare the two).
bool fused_append(const KeyState& ks, const ValueState& vs, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& pos, int64_t k_bits, int64_t v_bits, int64_t G, int64_t R) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("kivi::_static_append_one_", "");
  const char* env = std::getenv("KIVI_STATIC_APPEND_COMPOSITE");  // per call (tests switch it)
  if ((env != nullptr && env[0] == '1') || !k.is_cuda() || k.size(2) != 1 || ks.ring.scalar_type() != vs.ring.scalar_type() ||
      !op.hasKernelForDispatchKey(c10::DispatchKey::CUDA)) {
    return false;
  }
  using Sig = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                   const at::Tensor&, int64_t, int64_t, int64_t, int64_t);
  op.typed<Sig>().call(ks.ring, ks.scale, ks.zero, ks.codes, vs.ring, vs.scale, vs.zero, vs.codes, k, v, pos, k_bits,
                       v_bits, G, R);
  return true;
}

void static_kv_append_(const at::Tensor& k_store, const at::Tensor& v_store, const at::Tensor& k_in,
                       const at::Tensor& v_in, const at::Tensor& pos, int64_t k_bits, int64_t v_bits, int64_t G,
                       int64_t R) {
  check_new(k_store, k_in, pos, "k");
  check_new(v_store, v_in, pos, "v");
  const auto k = k_in.to(k_store.scalar_type());
  const auto v = v_in.to(v_store.scalar_type());
  const int64_t M = k.size(2), kP = 8 / k_bits;
  KeyState ks = key_state(k_store, k.size(3), k_bits, G, R);
  ValueState vs = value_state(v_store, v.size(3), v_bits, G, R);
  if (fused_append(ks, vs, k, v, pos, k_bits, v_bits, G, R)) return;
  const auto n = pos.narrow(0, 0, 1);  // [1], on the device

  // Keys: re-quantize every group that the new tokens touch. They span at most NW groups from
  // g0 = floor(n/G); a group's older tokens are in the ring (G divides R, so they belong to the
  // current R-block). Slots past the newest token hold zeros until their tokens arrive.
  const int64_t NW = (M + 2 * G - 2) / G;
  const auto g0 = at::div(n, G, "floor");
  const auto wpos = g0 * G + at::arange(NW * G, pos.options());  // [NW*G] window positions
  const auto shape = std::vector<int64_t>{1, 1, NW * G, 1};
  const auto from_ring = ks.ring.index_select(2, at::remainder(wpos, R));
  const auto from_new = k.index_select(2, at::clamp(wpos - n, 0, M - 1));
  const auto window = at::where((wpos < n).view(shape), from_ring,
                                at::where((wpos < n + M).view(shape), from_new, at::zeros_like(from_new)));
  auto [kc, ksc, kz] = quantize("keys", window, k_bits, G);
  ks.codes.index_copy_(2, g0 * (G / kP) + at::arange(NW * G / kP, pos.options()), kc);
  const auto groups = g0 + at::arange(NW, pos.options());
  ks.scale.index_copy_(2, groups, ksc);
  ks.zero.index_copy_(2, groups, kz);
  write_ring(ks.ring, k, pos, R);

  // Values: per-token groups need no neighbours; each token's codes go to its own row.
  auto [vc, vsc, vz] = quantize("values", v, v_bits, G);
  vs.codes.index_copy_(2, pos, vc);
  vs.scale.index_copy_(2, pos, vsc);
  vs.zero.index_copy_(2, pos, vz);
  write_ring(vs.ring, v, pos, R);
}

// [B, H, L, D] keys or values as the dynamic KIVI cache returns them after the append: dequantized
// below `split`, the ring from there on. A prefill into an empty cache (n == 0) attends in full
// precision (DESIGN §1): there the M new tokens themselves are placed at `pos`.
at::Tensor logical(const at::Tensor& dequant, const at::Tensor& ring, const at::Tensor& split, const at::Tensor& x,
                   const at::Tensor& pos, const at::Tensor& empty_before, int64_t R) {
  const int64_t L = dequant.size(2);
  const auto p = at::arange(L, pos.options());
  const auto fp = ring.index_select(2, at::remainder(p, R));
  const auto after = at::where((p < split).view({1, 1, L, 1}), dequant, fp);
  return at::where(empty_before.view({1, 1, 1, 1}), after.index_copy(2, pos, x.to(after.scalar_type())), after);
}

// One new token (M == 1, after its append): attention straight from the packed state, never
// materialising the dequantized store. Everything is indexed by position p in [0, L), with the
// streaming split end = n + 1 as device values (static shapes, no host sync):
//   keys   p < Q = floor(end/R)*R from codes (kivi::qmatmul_keys), Q <= p < end from ring slot p - Q;
//   values p < Tv = max(end-R, 0) from codes (kivi::qmatmul_values), Tv <= p < end from ring slot
//          p mod R: ring slot r holds position Tv + ((r - Tv) mod R), which is NOT r - Tv (the key
//          and value rings are rotated differently, so each side is gathered by position).
// The packed codes of the whole capacity are read (fixed shapes), never a dense copy of it. Scores,
// softmax and the products run in float32 (the scales and zeros, D/G or 1/G of the elements, are
// converted for that): a bf16 or fp16 score would round by up to 2^-8 or 2^-11 of its size, more
// than the dense path, whose SDPA accumulates in float32.
at::Tensor decode_from_packed(const at::Tensor& q, const KeyState& ks, const ValueState& vs, const at::Tensor& end,
                              const std::optional<at::Tensor>& attn_mask, int64_t k_bits, int64_t v_bits, int64_t G,
                              int64_t R, int64_t L, double scale) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = ks.ring.size(1), rep = Hq / Hkv;
  const auto f32 = q.options().dtype(at::kFloat);
  const auto minus_inf = at::full({}, -std::numeric_limits<double>::infinity(), f32);
  const auto qf = q.to(at::kFloat);
  const auto p = at::arange(L, end.options());  // positions
  const auto Q = at::div(end, R, "floor") * R, Tv = at::clamp_min(end - R, 0);

  // scores [B, Hq, 1, L] by position
  const auto s_codes =
      qmatmul("keys", qf, ks.codes, ks.scale.to(at::kFloat), ks.zero.to(at::kFloat), k_bits, G).narrow(3, 0, L);
  const auto s_ring = at::matmul(qf.view({B, Hkv, rep, D}), ks.ring.to(at::kFloat).transpose(2, 3))
                          .view({B, Hq, 1, R});
  const auto s_ring_by_pos = s_ring.index_select(3, at::clamp(p - Q, 0, R - 1));
  auto scores = at::where(p < Q, s_codes, at::where(p < end, s_ring_by_pos, minus_inf)) * scale;
  if (attn_mask.has_value() && attn_mask->defined()) {
    scores = attn_mask->scalar_type() == at::kBool ? at::where(*attn_mask, scores, minus_inf)
                                                   : scores + attn_mask->to(at::kFloat);
  }
  const auto probs = at::softmax(scores, -1);  // [B, Hq, 1, L]

  // values: codes below Tv, the ring (gathered by the position each slot holds) from Tv to end
  const auto p_codes = at::where(p < Tv, probs, at::zeros({}, f32));
  const auto out_codes = qmatmul("values", p_codes, vs.codes, vs.scale.to(at::kFloat), vs.zero.to(at::kFloat), v_bits, G);
  const auto slot_pos = Tv + at::remainder(at::arange(R, end.options()) - Tv, R);  // [R]
  const auto p_ring = at::where(slot_pos < end, probs.index_select(3, at::clamp_max(slot_pos, L - 1)), at::zeros({}, f32));
  const auto out_ring = at::matmul(p_ring.view({B, Hkv, rep, R}), vs.ring.to(at::kFloat)).view({B, Hq, 1, D});
  return (out_codes + out_ring).to(q.scalar_type()).contiguous();
}

// kivi::_mask_bits: a bool key mask [Bm, L] as int32 words [Bm, ceil(L / 32)], bit j of word w =
// mask[b, 32 w + j] (bits past L are 0): the form _static_decode_attention reads. This ATen
// composite serves every device but CUDA; csrc/cuda/mask_bits.cu packs in one kernel there (the
// composite's ~9 small kernels per layer were ~6 % of a compiled batch-1, 4k decode step).
at::Tensor mask_bits(const at::Tensor& mask) {
  KIVI_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2,
             "kivi: _mask_bits: mask must be a bool [batch, positions] tensor, got ", mask.scalar_type(), " ",
             mask.sizes());
  const int64_t Bm = mask.size(0), L = mask.size(1), W = (L + 31) / 32;
  auto w = mask.to(at::kLong);
  if (W * 32 > L) w = at::constant_pad_nd(w, {0, W * 32 - L}, 0);
  const auto pow2 = at::bitwise_left_shift(at::ones({32}, w.options()), at::arange(32, w.options()));
  auto words = (w.view({Bm, W, 32}) * pow2).sum(-1);  // [Bm, W] in [0, 2^32)
  words = at::where(words >= (int64_t{1} << 31), words - (int64_t{1} << 32), words);  // as int32 bits
  return words.to(at::kInt);
}

// The fused CUDA decode kernel (kivi::_static_decode_attention, csrc/cuda/decode_attention.cu) when
// it takes this step: CUDA build, fp16/bf16, 2/4 bits, head_dim 64/128, G 32/64/128, a store of at
// least R + 64 positions (a multiple of 8: aligned regions), and no mask or a bool key mask [B|1,1,1,L]
// (padded batches; handed over as bits). KIVI_STATIC_COMPOSITE=1 keeps decode_from_packed (tests).
std::optional<at::Tensor> fused_decode(const at::Tensor& q, const KeyState& ks, const ValueState& vs,
                                       const at::Tensor& end, const std::optional<at::Tensor>& attn_mask,
                                       int64_t k_bits, int64_t v_bits, int64_t G, int64_t R, int64_t L,
                                       double scale) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("kivi::_static_decode_attention", "");
  const char* env = std::getenv("KIVI_STATIC_COMPOSITE");  // per call (tests switch it): a host-side lookup
  const bool composite = env != nullptr && env[0] == '1';
  const int64_t D = q.size(3);
  const auto dt = q.scalar_type();
  const bool ok = !composite && q.is_cuda() && op.hasKernelForDispatchKey(c10::DispatchKey::CUDA) &&
                  (dt == at::kHalf || dt == at::kBFloat16) && ks.ring.scalar_type() == dt &&
                  (k_bits == 2 || k_bits == 4) && (v_bits == 2 || v_bits == 4) && (D == 64 || D == 128) &&
                  (G == 32 || G == 64 || G == 128) && L >= R + 64 && L % 8 == 0;
  if (!ok) return std::nullopt;
  std::optional<at::Tensor> bits;
  if (attn_mask.has_value() && attn_mask->defined()) {
    const auto& m = *attn_mask;
    if (m.scalar_type() != at::kBool || m.dim() != 4 || m.size(1) != 1 || m.size(2) != 1 ||
        (m.size(0) != 1 && m.size(0) != q.size(0))) {
      return std::nullopt;
    }
    static const auto pack = c10::Dispatcher::singleton().findSchemaOrThrow("kivi::_mask_bits", "");
    bits = pack.typed<at::Tensor(const at::Tensor&)>().call(m.select(2, 0).select(1, 0));  // [Bm, L] view
  }
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const std::optional<at::Tensor>&, int64_t, int64_t, int64_t, int64_t, double);
  return op.typed<Sig>().call(q, ks.codes, ks.scale, ks.zero, vs.codes, vs.scale, vs.zero, ks.ring, vs.ring, end, bits,
                              k_bits, v_bits, G, R, scale);
}

at::Tensor static_kv_attention(const at::Tensor& q, const at::Tensor& k_store, const at::Tensor& v_store,
                               const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
                               const std::optional<at::Tensor>& attn_mask, bool is_causal, int64_t k_bits,
                               int64_t v_bits, int64_t G, int64_t R, double scale) {
  check_new(k_store, k, pos, "k");
  check_new(v_store, v, pos, "v");
  KIVI_CHECK(q.dim() == 4 && q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(1) % k.size(1) == 0,
              "kivi: q must be [B, Hq, M, D] with Hq a multiple of the KV heads, got ", q.sizes());
  const int64_t L = k_store.size(2), M = k.size(2);
  KeyState ks = key_state(k_store, k.size(3), k_bits, G, R);
  ValueState vs = value_state(v_store, v.size(3), v_bits, G, R);
  const auto n = pos.narrow(0, 0, 1);  // tokens before this step's append
  const auto end = n + M;              // tokens after it
  const bool has_mask = attn_mask.has_value() && attn_mask->defined();
  if (has_mask) {
    KIVI_CHECK(attn_mask->size(-1) == L, "kivi: attn_mask must cover the store's ", L, " positions, got ",
                attn_mask->sizes());
  }
  if (M == 1) {  // a decode step (a 1-token prefill into an empty cache reads its token from the rings)
    if (auto out = fused_decode(q, ks, vs, end, attn_mask, k_bits, v_bits, G, R, L, scale)) return *out;
    return decode_from_packed(q, ks, vs, end, attn_mask, k_bits, v_bits, G, R, L, scale);
  }

  // KIVI streaming split after the append: keys quantized in whole R-blocks, values all but the newest R.
  const auto empty_before = n == 0;
  const auto kq = dequantize("keys", ks.codes, ks.scale, ks.zero, k_bits, G).narrow(2, 0, L);
  const auto vq = dequantize("values", vs.codes, vs.scale, vs.zero, v_bits, G);
  const auto K = logical(kq, ks.ring, at::div(end, R, "floor") * R, k, pos, empty_before, R).to(q.scalar_type());
  const auto V = logical(vq, vs.ring, at::clamp_min(end - R, 0), v, pos, empty_before, R).to(q.scalar_type());

  // Visible: positions up to the newest token; causal (query i at pos[i] sees p <= pos[i]) when asked.
  const auto p = at::arange(L, pos.options()).view({1, 1, 1, L});
  auto visible = is_causal ? (p <= pos.view({1, 1, M, 1})) : (p < end.view({1, 1, 1, 1}));
  std::optional<at::Tensor> mask;
  if (has_mask) {
    if (attn_mask->scalar_type() == at::kBool) {
      mask = at::logical_and(visible, *attn_mask);
    } else {  // additive float mask
      mask = at::where(visible, attn_mask->to(q.scalar_type()),
                       at::full({}, -std::numeric_limits<double>::infinity(), q.options()));
    }
  } else {
    mask = visible;
  }
  // contiguous: the fake kernel promises a contiguous [B, Hq, M, D] (SDPA backends pick their own strides)
  return at::scaled_dot_product_attention(q, K, V, mask, 0.0, false, scale, /*enable_gqa=*/q.size(1) != k.size(1))
      .contiguous();
}

}  // namespace
}  // namespace kivi::static_cache

TORCH_LIBRARY_FRAGMENT(kivi, m) {
  // Appends M new tokens (k, v [B,H,M,D] at positions pos int64 [M] = n..n+M-1) to the KIVI state
  // held in the stores [B,H,L,D] (layout at the top of csrc/static_cache.cpp). Mutates only the stores.
  m.def(
      "static_kv_append_(Tensor(a!) k_store, Tensor(b!) v_store, Tensor k, Tensor v, Tensor pos, int k_bits, "
      "int v_bits, int group_size, int residual_length) -> ()");
  // Attention of q [B,Hq,M,D] over the state AFTER static_kv_append_ of the same k, v, pos (like the
  // dynamic KIVICache: quantized part + full-precision residual split by KIVI's streaming rule for
  // n + M tokens), except that a prefill into an empty cache (pos[0] == 0) attends to its k, v in
  // full precision. attn_mask (bool, or additive float) covers the L store positions; -> [B,Hq,M,D].
  m.def(
      "static_kv_attention(Tensor q, Tensor k_store, Tensor v_store, Tensor k, Tensor v, Tensor pos, "
      "Tensor? attn_mask, bool is_causal, int k_bits, int v_bits, int group_size, int residual_length, "
      "float scale) -> Tensor");
  // static_kv_append_'s one-token step on CUDA (fused_append above; csrc/cuda/static_append.cu): the
  // carved regions of both stores (key_state / value_state) and the new token k, v [B,H,1,D].
  m.def(
      "_static_append_one_(Tensor(a!) k_ring, Tensor(b!) k_scale, Tensor(c!) k_zero, Tensor(d!) k_codes, "
      "Tensor(e!) v_ring, Tensor(f!) v_scale, Tensor(g!) v_zero, Tensor(h!) v_codes, Tensor k, Tensor v, Tensor pos, "
      "int k_bits, int v_bits, int group_size, int residual_length) -> ()");
  // static_kv_attention's decode step on CUDA (M == 1; layout and conditions: fused_decode above and
  // csrc/cuda/decode_attention.cu); end int64 [1] = tokens after the append, on the device.
  m.def(
      "_static_decode_attention(Tensor q, Tensor k_codes, Tensor k_scale, Tensor k_zero, Tensor v_codes, "
      "Tensor v_scale, Tensor v_zero, Tensor k_ring, Tensor v_ring, Tensor end, Tensor? mask_bits, int k_bits, "
      "int v_bits, int group_size, int residual_length, float scale) -> Tensor");
  // A bool key mask [Bm, L] packed into int32 words [Bm, ceil(L / 32)] for _static_decode_attention.
  m.def("_mask_bits(Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(kivi, CompositeExplicitAutograd, m) {
  m.impl("static_kv_append_", &kivi::static_cache::static_kv_append_);
  m.impl("static_kv_attention", &kivi::static_cache::static_kv_attention);
  m.impl("_mask_bits", &kivi::static_cache::mask_bits);
}
