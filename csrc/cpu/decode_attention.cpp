// CPU decode attention over a KIVI cache: softmax(q [Kq ‖ Kres]^T * scale) [Vq ‖ Vres].
// Keys and values may split at different tokens (Tk quantized keys, Tv quantized values) but
// both hold T = Tk + Rk = Tv + Rv tokens. One (batch, KV head) per task; all its query rows.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "common.h"
#include "dequant_rows.h"

namespace kivi::cpu {
namespace {

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
  const auto q = q_in.contiguous(), kc = kc_in.contiguous(), ks = ks_in.contiguous(), kz = kz_in.contiguous();
  const auto vc = vc_in.contiguous(), vs = vs_in.contiguous(), vz = vz_in.contiguous();
  const auto kr = kr_in.contiguous(), vr = vr_in.contiguous();
  const int64_t n_rep = Hq / Hkv, rows = n_rep * M;
  const float sm = static_cast<float>(softmax_scale);
  auto out = at::empty({B, Hq, M, D}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "kivi_decode_attention_cpu", [&] {
    at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qf(rows * D), row(D), scores(rows * T), acc(rows * D);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / Hkv, h = bh % Hkv, L = len[b];
        const scalar_t* qh = q.const_data_ptr<scalar_t>() + (b * Hq + h * n_rep) * M * D;
        for (int64_t i = 0; i < rows * D; ++i) qf[i] = static_cast<float>(qh[i]);
        for (int64_t t = 0; t < L; ++t) {
          if (t < Tk) {
            key_row(kc.const_data_ptr<uint8_t>() + bh * (Tk / kP) * D, ks.const_data_ptr<scalar_t>() + bh * (Tk / G) * D,
                    kz.const_data_ptr<scalar_t>() + bh * (Tk / G) * D, t, D, k_bits, G, row.data());
          } else {
            const scalar_t* r = kr.const_data_ptr<scalar_t>() + (bh * Rk + (t - Tk)) * D;
            for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(r[d]);
          }
          for (int64_t i = 0; i < rows; ++i) {
            float s = 0.f;
            for (int64_t d = 0; d < D; ++d) s += qf[i * D + d] * row[d];
            scores[i * T + t] = s * sm;
          }
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t i = 0; i < rows; ++i) {  // softmax over the valid tokens, in float32
          float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
          for (int64_t t = 0; t < L; ++t) mx = std::max(mx, scores[i * T + t]);
          for (int64_t t = 0; t < L; ++t) sum += (scores[i * T + t] = std::exp(scores[i * T + t] - mx));
          for (int64_t t = 0; t < L; ++t) scores[i * T + t] /= sum;
        }
        for (int64_t t = 0; t < L; ++t) {
          if (t < Tv) {
            value_row(vc.const_data_ptr<uint8_t>() + bh * Tv * (D / vP), vs.const_data_ptr<scalar_t>() + bh * Tv * (D / G),
                      vz.const_data_ptr<scalar_t>() + bh * Tv * (D / G), t, D, v_bits, G, row.data());
          } else {
            const scalar_t* r = vr.const_data_ptr<scalar_t>() + (bh * Rv + (t - Tv)) * D;
            for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(r[d]);
          }
          for (int64_t i = 0; i < rows; ++i) {
            const float w = scores[i * T + t];
            for (int64_t d = 0; d < D; ++d) acc[i * D + d] += w * row[d];
          }
        }
        scalar_t* oh = out.mutable_data_ptr<scalar_t>() + (b * Hq + h * n_rep) * M * D;
        // A sequence with no valid token has nothing to attend to: NaN, like SDPA with an all-masked row.
        const float fill = L == 0 ? std::numeric_limits<float>::quiet_NaN() : 0.f;
        for (int64_t i = 0; i < rows * D; ++i) oh[i] = static_cast<scalar_t>(L == 0 ? fill : acc[i]);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace kivi::cpu

TORCH_LIBRARY_IMPL(kivi, CPU, m) { m.impl("decode_attention", &kivi::cpu::decode_attention); }
