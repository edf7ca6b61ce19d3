// CPU decode attention over a KIVI cache: softmax(q [Kq ‖ Kres]^T * scale) [Vq ‖ Vres].
// Keys and values may split at different tokens (Tk quantized keys, Tv quantized values) but
// both hold T = Tk + Rk = Tv + Rv tokens.
//
// Flash-decoding on the CPU: a task is one (batch, KV head) and one chunk of its tokens, so a single
// sequence with few KV heads still uses every thread; each task keeps (max, sum, acc) in float32 for
// all the head's query rows, and a second pass merges the chunks. The inner loops run over
// contiguous channels with no divisions, so the compiler vectorizes them:
//   keys   (per-channel groups)  q . k_t = sum_d (q_d s_gd) c_td + sum_d q_d z_gd, with q*s and q.z
//          built once per key group of G tokens;
//   values (per-token groups)    acc_d += (p s_tg) c_td + p z_tg, a code row unpacked to float first.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "code_rows.h"
#include "common.h"

namespace kivi::cpu {
namespace {

// One head's packed and residual tensors (pointers at the head's first element; rows contiguous).
template <typename scalar_t>
struct Head {
  const uint8_t* kc;  // [Tk / kP, D]
  const scalar_t *ks, *kz;  // [Tk / G, D]
  const uint8_t* vc;  // [Tv, D / vP]
  const scalar_t *vs, *vz;  // [Tv, D / G]
  const scalar_t *kr, *vr;  // [Rk, D], [Rv, D]
};

struct Shape {
  int64_t D, G, Tk, Tv, rows;
  int kbits, vbits;
  float scale;
};

// Scratch floats attend_chunk needs for a chunk of n tokens (its `work` argument, laid out there).
inline int64_t chunk_work_floats(int64_t D, int64_t G, int64_t rows, int64_t n) {
  return 4 * D + rows * (D + 1 + n + D / G);
}

// Tokens [t0, t1) of one head for its `rows` query rows qf [rows, D] (float32): writes the chunk's
// running max m [rows], sum l [rows] and unnormalized acc [rows, D].
template <typename scalar_t>
KIVI_CPU_MULTIVERSION void attend_chunk(const Head<scalar_t>& h, const Shape& s, const float* qf, int64_t t0, int64_t t1, float* m, float* l,
                  float* acc, float* work) {
  const int64_t D = s.D, G = s.G, rows = s.rows, n = t1 - t0, kP = 8 / s.kbits, vP = 8 / s.vbits;
  float* cf = work;                // [D] one token's codes (or residual row) as float
  float* sz = cf + D;              // [2 * D] the current key group's scale and zero rows as float
  float* qs = sz + 2 * D;          // [rows, D] q * s of the current key group
  float* qz = qs + rows * D;       // [rows] q . z of the current key group
  float* sc = qz + rows;           // [rows, n] scores, then probabilities
  float* cf2 = sc + rows * n;      // [D] the next token's codes (values, two tokens per pass)
  float* zs = cf2 + D;             // [rows, D / G] the values' zero terms, sum_t p z_tg per group
  int64_t group = -1;
  for (int64_t t = t0; t < t1; ++t) {
    if (t < s.Tk) {
      if (t / G != group) {  // a new key group: q * s and q . z in float32
        group = t / G;
        fold_key_group(qf, h.ks + group * D, h.kz + group * D, rows, D, sz, qs, qz);
      }
      unpack_keys(s.kbits, h.kc + (t / kP) * D, static_cast<int>((t % kP) * s.kbits), D, cf);
      for (int64_t i = 0; i < rows; ++i) sc[i * n + (t - t0)] = (dot(qs + i * D, cf, D) + qz[i]) * s.scale;
    } else {
      const scalar_t* r = h.kr + (t - s.Tk) * D;
      for (int64_t d = 0; d < D; ++d) cf[d] = static_cast<float>(r[d]);
      for (int64_t i = 0; i < rows; ++i) sc[i * n + (t - t0)] = dot(qf + i * D, cf, D) * s.scale;
    }
  }
  for (int64_t i = 0; i < rows; ++i) {  // the chunk's softmax statistics, in float32
    float* row = sc + i * n;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, row[j]);
    exp_softmax(row, n, mx);
    m[i] = mx;
    l[i] = sum_of(row, n);
  }
  // Values: acc[i, d] += (p s_tg) c_td, two tokens per pass over acc (half its loads and stores);
  // the zero terms p z_tg are the same for a whole group, so they are summed per group in zs and
  // added once at the end.
  const int64_t NG = D / G, tq = std::max(t0, std::min(t1, s.Tv));  // quantized values: [t0, tq)
  std::fill(acc, acc + rows * D, 0.f);
  std::fill(zs, zs + rows * NG, 0.f);
  for (int64_t t = t0; t < tq; t += 2) {
    // tokens t and t + 1; a last odd token pairs with itself at weight 0
    const bool pair = t + 1 < tq;
    unpack_values(s.vbits, h.vc + t * (D / vP), D, cf);
    if (pair) unpack_values(s.vbits, h.vc + (t + 1) * (D / vP), D, cf2);
    const float* c1 = pair ? cf2 : cf;
    const scalar_t *s0 = h.vs + t * NG, *z0 = h.vz + t * NG, *s1 = pair ? s0 + NG : s0, *z1 = pair ? z0 + NG : z0;
    for (int64_t i = 0; i < rows; ++i) {
      const float p0 = sc[i * n + (t - t0)], p1 = pair ? sc[i * n + (t + 1 - t0)] : 0.f;
      float* a = acc + i * D;
      for (int64_t g = 0; g < NG; ++g) {
        const float w0 = p0 * static_cast<float>(s0[g]), w1 = p1 * static_cast<float>(s1[g]);
        zs[i * NG + g] += p0 * static_cast<float>(z0[g]) + p1 * static_cast<float>(z1[g]);
        for (int64_t d = g * G; d < (g + 1) * G; ++d) a[d] += w0 * cf[d] + w1 * c1[d];
      }
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t g = 0; g < NG; ++g) {
      for (int64_t d = g * G; d < (g + 1) * G; ++d) acc[i * D + d] += zs[i * NG + g];
    }
  }
  for (int64_t t = tq; t < t1; ++t) {  // full-precision values
    const scalar_t* r = h.vr + (t - s.Tv) * D;
    for (int64_t d = 0; d < D; ++d) cf[d] = static_cast<float>(r[d]);
    for (int64_t i = 0; i < rows; ++i) {
      const float p = sc[i * n + (t - t0)];
      float* a = acc + i * D;
      for (int64_t d = 0; d < D; ++d) a[d] += p * cf[d];
    }
  }
}

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& kc_in, const at::Tensor& ks_in,
                            const at::Tensor& kz_in, const at::Tensor& vc_in, const at::Tensor& vs_in,
                            const at::Tensor& vz_in, const at::Tensor& kr_in, const at::Tensor& vr_in, int64_t k_bits,
                            int64_t v_bits, int64_t G, double softmax_scale, const std::optional<at::Tensor>& lengths_in) {
  check_bits_group(k_bits, G);
  check_bits_group(v_bits, G);
  check_packed(kc_in, ks_in, kz_in);
  check_packed(vc_in, vs_in, vz_in);
  check_float_4d(q_in, "q");
  check_float_4d(kr_in, "k_residual");
  check_float_4d(vr_in, "v_residual");
  const auto dtype = q_in.scalar_type();
  for (const auto* t : {&ks_in, &vs_in, &kr_in, &vr_in}) {
    KIVI_CHECK(t->scalar_type() == dtype, "kivi: decode_attention needs one dtype for q, scales and residuals; q is ",
                dtype, ", got ", t->scalar_type());
  }
  const int64_t B = q_in.size(0), Hq = q_in.size(1), M = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = kc_in.size(1), kP = 8 / k_bits, vP = 8 / v_bits;
  const int64_t Tk = kc_in.size(2) * kP, Tv = vc_in.size(2), Rk = kr_in.size(2), Rv = vr_in.size(2), T = Tk + Rk;
  KIVI_CHECK(Hkv > 0 && Hq % Hkv == 0, "kivi: q heads (", Hq, ") must be a multiple of the KV heads (", Hkv, ")");
  KIVI_CHECK(kc_in.size(0) == B && kc_in.size(3) == D && Tk % G == 0 && ks_in.size(0) == B && ks_in.size(1) == Hkv &&
                  ks_in.size(2) == Tk / G && ks_in.size(3) == D,
              "kivi: packed keys must be codes [B, Hkv, Tk*bits/8, D] with scale/zero [B, Hkv, Tk/G, D]");
  KIVI_CHECK(vc_in.size(0) == B && vc_in.size(1) == Hkv && vc_in.size(3) * vP == D && D % G == 0 &&
                  vs_in.size(0) == B && vs_in.size(1) == Hkv && vs_in.size(2) == Tv && vs_in.size(3) == D / G,
              "kivi: packed values must be codes [B, Hkv, Tv, D*bits/8] with scale/zero [B, Hkv, Tv, D/G]");
  KIVI_CHECK(kr_in.size(0) == B && kr_in.size(1) == Hkv && kr_in.size(3) == D && vr_in.size(0) == B &&
                  vr_in.size(1) == Hkv && vr_in.size(3) == D,
              "kivi: k_residual and v_residual must be [B, Hkv, R, D]");
  KIVI_CHECK(Tv + Rv == T, "kivi: keys hold ", T, " tokens (", Tk, " quantized + ", Rk, " residual) but values hold ",
              Tv + Rv, " (", Tv, " + ", Rv, ")");
  std::vector<int64_t> len(B, T);
  if (lengths_in.has_value()) {
    const auto& l = *lengths_in;
    KIVI_CHECK(l.dim() == 1 && l.size(0) == B && l.device().is_cpu(), "kivi: lengths must be a CPU tensor of shape [",
                B, "]");
    const auto l64 = l.to(at::kLong).contiguous();
    for (int64_t b = 0; b < B; ++b) len[b] = std::min<int64_t>(std::max<int64_t>(l64.const_data_ptr<int64_t>()[b], 0), T);
  }
  const auto q = q_in.contiguous();
  const auto kc = rows_contiguous(kc_in), ks = rows_contiguous(ks_in), kz = rows_contiguous(kz_in);
  const auto vc = rows_contiguous(vc_in), vs = rows_contiguous(vs_in), vz = rows_contiguous(vz_in);
  const auto kr = rows_contiguous(kr_in), vr = rows_contiguous(vr_in);
  const int64_t n_rep = Hq / Hkv, rows = n_rep * M;
  auto out = at::empty({B, Hq, M, D}, q.options());
  if (out.numel() == 0) return out;

  // Chunks per head: enough tasks for every thread (twice over, for balance), at least 256 tokens each.
  constexpr int64_t kMinChunk = 256;
  const int64_t heads = B * Hkv;
  const int64_t want = std::max<int64_t>(1, (2 * at::get_num_threads() + heads - 1) / heads);
  const int64_t S = std::max<int64_t>(1, std::min<int64_t>(want, (T + kMinChunk - 1) / kMinChunk));
  const int64_t chunk = std::max<int64_t>(1, (T + S - 1) / S);
  const Shape shape{D, G, Tk, Tv, rows, static_cast<int>(k_bits), static_cast<int>(v_bits),
                    static_cast<float>(softmax_scale)};
  std::vector<float> part_m(heads * S * rows), part_l(heads * S * rows), part_acc(heads * S * rows * D);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "kivi_decode_attention_cpu", [&] {
    at::parallel_for(0, heads * S, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qf(rows * D), work(chunk_work_floats(D, G, rows, chunk));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / S, c = task % S, b = bh / Hkv, h = bh % Hkv;
        const int64_t t0 = std::min(c * chunk, len[b]), t1 = std::min(t0 + chunk, len[b]);
        float* m = part_m.data() + task * rows;
        float* l = part_l.data() + task * rows;
        float* acc = part_acc.data() + task * rows * D;
        if (t0 >= t1) {  // nothing in this chunk: a neutral part
          std::fill(m, m + rows, -std::numeric_limits<float>::infinity());
          std::fill(l, l + rows, 0.f);
          std::fill(acc, acc + rows * D, 0.f);
          continue;
        }
        const scalar_t* qh = q.const_data_ptr<scalar_t>() + (b * Hq + h * n_rep) * M * D;
        for (int64_t i = 0; i < rows * D; ++i) qf[i] = static_cast<float>(qh[i]);
        const Head<scalar_t> head{kc.const_data_ptr<uint8_t>() + head_offset(kc, b, h),
                                  ks.const_data_ptr<scalar_t>() + head_offset(ks, b, h),
                                  kz.const_data_ptr<scalar_t>() + head_offset(kz, b, h),
                                  vc.const_data_ptr<uint8_t>() + head_offset(vc, b, h),
                                  vs.const_data_ptr<scalar_t>() + head_offset(vs, b, h),
                                  vz.const_data_ptr<scalar_t>() + head_offset(vz, b, h),
                                  kr.const_data_ptr<scalar_t>() + head_offset(kr, b, h),
                                  vr.const_data_ptr<scalar_t>() + head_offset(vr, b, h)};
        attend_chunk<scalar_t>(head, shape, qf.data(), t0, t1, m, l, acc, work.data());
      }
    });
    // merge the chunks of each (batch, KV head): out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c
    at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> o(D);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / Hkv, h = bh % Hkv;
        scalar_t* oh = out.mutable_data_ptr<scalar_t>() + (b * Hq + h * n_rep) * M * D;
        for (int64_t i = 0; i < rows; ++i) {
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t c = 0; c < S; ++c) mx = std::max(mx, part_m[(bh * S + c) * rows + i]);
          // A sequence with no valid token has nothing to attend to: NaN, like SDPA with an all-masked row.
          if (mx == -std::numeric_limits<float>::infinity()) {
            for (int64_t d = 0; d < D; ++d) oh[i * D + d] = static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());
            continue;
          }
          float sum = 0.f;
          std::fill(o.begin(), o.end(), 0.f);
          for (int64_t c = 0; c < S; ++c) {
            const int64_t part = (bh * S + c) * rows + i;
            const float w = std::exp(part_m[part] - mx);  // 0 for an empty chunk (m = -inf)
            sum += w * part_l[part];
            const float* a = part_acc.data() + part * D;
            for (int64_t d = 0; d < D; ++d) o[d] += w * a[d];
          }
          for (int64_t d = 0; d < D; ++d) oh[i * D + d] = static_cast<scalar_t>(o[d] / sum);
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace kivi::cpu

TORCH_LIBRARY_IMPL(kivi, CPU, m) { m.impl("decode_attention", &kivi::cpu::decode_attention); }
