// CPU Q_MatMul: scores = q @ dequant(K)^T and out = p @ dequant(V), straight from packed codes,
// with grouped-query mapping (query head h reads KV head h / (Hq / Hkv)). As in decode attention:
// keys   q . k_t = sum_d (q_d s_gd) c_td + q . z_g, q*s and q.z built once per key group;
// values out_d += (p_t s_tg) c_td + p_t z_tg, a code row unpacked to float first.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "code_rows.h"
#include "common.h"

namespace kivi::cpu {
namespace {

void check_query(const at::Tensor& q, const char* name, const at::Tensor& scale, int64_t B, int64_t Hkv) {
  check_float_4d(q, name);
  KIVI_CHECK(q.scalar_type() == scale.scalar_type(), "kivi: ", name, " dtype (", q.scalar_type(),
              ") must match the cache's scale dtype (", scale.scalar_type(), ")");
  KIVI_CHECK(q.size(0) == B, "kivi: ", name, " batch (", q.size(0), ") must match the cache batch (", B, ")");
  KIVI_CHECK(q.size(1) % Hkv == 0, "kivi: ", name, " heads (", q.size(1), ") must be a multiple of the KV heads (",
              Hkv, ")");
}

at::Tensor qmatmul_keys(const at::Tensor& q_in, const at::Tensor& codes_in, const at::Tensor& scale_in,
                        const at::Tensor& zero_in, int64_t bits, int64_t G) {
  check_bits_group(bits, G);
  check_packed(codes_in, scale_in, zero_in);
  const auto codes = rows_contiguous(codes_in), scale = rows_contiguous(scale_in), zero = rows_contiguous(zero_in);
  const int64_t B = codes.size(0), Hkv = codes.size(1), P = 8 / bits, T = codes.size(2) * P, D = codes.size(3);
  KIVI_CHECK(T % G == 0 && scale.size(2) == T / G && scale.size(3) == D, "kivi: scale/zero do not match codes");
  check_query(q_in, "q", scale, B, Hkv);
  KIVI_CHECK(q_in.size(3) == D, "kivi: q's head_dim (", q_in.size(3), ") must match the keys' (", D, ")");
  const auto q = q_in.contiguous();
  const int64_t Hq = q.size(1), M = q.size(2), n_rep = Hq / Hkv;
  auto out = at::empty({B, Hq, M, T}, q.options());
  // tasks: (batch, KV head) x whole key groups, so one sequence with few heads uses every thread
  const int64_t rows = n_rep * M, groups = T / G;
  const int64_t per_task = std::max<int64_t>(1, std::min<int64_t>(groups, 2048 / G));
  const int64_t chunks = groups == 0 ? 0 : (groups + per_task - 1) / per_task;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kivi_qmatmul_keys_cpu", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * Hkv * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qf(rows * D), qs(rows * D), qz(rows), cf(D), sz(2 * D);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / chunks, c = task % chunks, b = bh / Hkv, h = bh % Hkv;
        const scalar_t* qh = qp + (b * Hq + h * n_rep) * M * D;  // n_rep*M rows of D
        for (int64_t i = 0; i < rows * D; ++i) qf[i] = static_cast<float>(qh[i]);
        scalar_t* oh = op + (b * Hq + h * n_rep) * M * T;
        const uint8_t* kc = codes.const_data_ptr<uint8_t>() + head_offset(codes, b, h);
        const scalar_t* ks = scale.const_data_ptr<scalar_t>() + head_offset(scale, b, h);
        const scalar_t* kz = zero.const_data_ptr<scalar_t>() + head_offset(zero, b, h);
        for (int64_t g = c * per_task; g < std::min(groups, (c + 1) * per_task); ++g) {
          fold_key_group(qf.data(), ks + g * D, kz + g * D, rows, D, sz.data(), qs.data(), qz.data());
          for (int64_t t = g * G; t < (g + 1) * G; ++t) {
            unpack_keys(static_cast<int>(bits), kc + (t / P) * D, static_cast<int>((t % P) * bits), D, cf.data());
            for (int64_t r = 0; r < rows; ++r) oh[r * T + t] = static_cast<scalar_t>(dot(qs.data() + r * D, cf.data(), D) + qz[r]);
          }
        }
      }
    });
  });
  return out;
}

at::Tensor qmatmul_values(const at::Tensor& p_in, const at::Tensor& codes_in, const at::Tensor& scale_in,
                          const at::Tensor& zero_in, int64_t bits, int64_t G) {
  check_bits_group(bits, G);
  check_packed(codes_in, scale_in, zero_in);
  const auto codes = rows_contiguous(codes_in), scale = rows_contiguous(scale_in), zero = rows_contiguous(zero_in);
  const int64_t B = codes.size(0), Hkv = codes.size(1), T = codes.size(2), P = 8 / bits, D = codes.size(3) * P;
  KIVI_CHECK(D % G == 0 && scale.size(2) == T && scale.size(3) == D / G, "kivi: scale/zero do not match codes");
  check_query(p_in, "p", scale, B, Hkv);
  KIVI_CHECK(p_in.size(3) == T, "kivi: p's last dimension (", p_in.size(3), ") must be the token count (", T, ")");
  const auto p = p_in.contiguous();
  const int64_t Hq = p.size(1), M = p.size(2), n_rep = Hq / Hkv;
  auto out = at::empty({B, Hq, M, D}, p.options());
  const int64_t rows = n_rep * M, NG = D / G;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "kivi_qmatmul_values_cpu", [&] {
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> cf(D), acc(rows * D);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / Hkv, h = bh % Hkv;
        const scalar_t* ph = pp + (b * Hq + h * n_rep) * M * T;
        const uint8_t* vc = codes.const_data_ptr<uint8_t>() + head_offset(codes, b, h);
        const scalar_t* vs = scale.const_data_ptr<scalar_t>() + head_offset(scale, b, h);
        const scalar_t* vz = zero.const_data_ptr<scalar_t>() + head_offset(zero, b, h);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t t = 0; t < T; ++t) {
          unpack_values(static_cast<int>(bits), vc + t * (D / P), D, cf.data());
          for (int64_t r = 0; r < rows; ++r) {
            add_value_row(static_cast<float>(ph[r * T + t]), cf.data(), vs + t * NG, vz + t * NG, D, G, acc.data() + r * D);
          }
        }
        scalar_t* oh = op + (b * Hq + h * n_rep) * M * D;
        for (int64_t i = 0; i < rows * D; ++i) oh[i] = static_cast<scalar_t>(acc[i]);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace kivi::cpu

TORCH_LIBRARY_IMPL(kivi, CPU, m) {
  m.impl("qmatmul_keys", &kivi::cpu::qmatmul_keys);
  m.impl("qmatmul_values", &kivi::cpu::qmatmul_values);
}
