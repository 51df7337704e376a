// Fused passes of the CPU runtime (nnpq.kernels.cpu), each replacing a chain of elementwise torch
// ops with one pass over memory: for the fast mode's layer 0 around torch._int_mm, splitting rows
// into two INT8 planes and combining the three int32 products with the scales, the bias and CELU;
// for the exact mode, dequantizing int8 codes to float32 weights.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

using at::Tensor;

namespace {

constexpr float kInt8Max = 127.0f;
constexpr float kPlaneRatio = 254.0f;

// One row: int8 stores may alias anything, so the loops see only restrict pointers and locals
// (captured references would be reloaded after every store and the loops would not vectorize).
void split_row(const float* __restrict row, const float* __restrict cl, int8_t* __restrict q1,
               int8_t* __restrict q2, float* __restrict scale, const int64_t k) {
  float top = 0.0f;
  for (int64_t j = 0; j < k; ++j) top = std::max(top, std::fabs(row[j] * cl[j]));
  const float s = std::max(top, 1e-30f) / kInt8Max;
  const float inv = 1.0f / s;
  *scale = s;
  for (int64_t j = 0; j < k; ++j) {
    const float t = std::min(std::max(row[j] * cl[j] * inv, -kInt8Max), kInt8Max);
    const float a = std::nearbyint(t);
    q1[j] = static_cast<int8_t>(a);
    q2[j] = static_cast<int8_t>(std::nearbyint((t - a) * kPlaneRatio));
  }
}

// y = x * col (col (K,) float32, or empty: y = x) -> codes (2M, K) int8 (plane 1 rows, then
// plane 2 rows) and scale (M, 1): y ~ scale * (q1 + q2 / 254).
std::tuple<Tensor, Tensor> split_rows(const Tensor& x_in, const Tensor& col_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "split_rows: x must be (M, K) float32");
  auto x = x_in.contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  Tensor col = col_in.numel() == k ? col_in.to(at::kFloat).contiguous() : at::ones({k}, x.options());
  const float* cl = col.data_ptr<float>();
  auto codes = at::empty({2 * m, k}, x.options().dtype(at::kChar));
  auto scale = at::empty({m, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* cp = codes.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  at::parallel_for(0, m, 16, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      split_row(xp + i * k, cl, cp + i * k, cp + (m + i) * k, sp + i, k);
    }
  });
  return {codes, scale};
}

void combine_row(const int32_t* __restrict c1, const int32_t* __restrict c2, const int32_t* __restrict f,
                 const float r, const float* __restrict cs, const float* __restrict bias, const float alpha,
                 float* __restrict out, const int64_t n) {
  const float inv_ratio = 1.0f / kPlaneRatio;
  // branch-free loops, one per option, so each vectorizes
  if (f) {
    for (int64_t j = 0; j < n; ++j) out[j] = (static_cast<float>(c1[j]) + static_cast<float>(c2[j] + f[j]) * inv_ratio) * r;
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = (static_cast<float>(c1[j]) + static_cast<float>(c2[j]) * inv_ratio) * r;
  }
  if (cs) for (int64_t j = 0; j < n; ++j) out[j] *= cs[j];
  if (bias) for (int64_t j = 0; j < n; ++j) out[j] += bias[j];
  if (alpha > 0.0f) {
    const float inv_alpha = 1.0f / alpha;
    for (int64_t j = 0; j < n; ++j) {
      const float v = out[j];
      out[j] = v > 0.0f ? v : alpha * (std::exp(v * inv_alpha) - 1.0f);
    }
  }
}

void dequantize_row(const int8_t* __restrict q, const float* __restrict scale, const float* __restrict zero,
                    const float* __restrict inv_col, float* __restrict out, const int64_t k, const int64_t group) {
  for (int64_t g = 0; g * group < k; ++g) {
    const float s = scale[g], z = zero ? zero[g] : 0.0f;
    for (int64_t j = g * group; j < (g + 1) * group; ++j) out[j] = (static_cast<float>(q[j]) - z) * s;
  }
  if (inv_col) for (int64_t j = 0; j < k; ++j) out[j] *= inv_col[j];
}

// (coarse[:M] + (coarse[M:] + fine) / 254) * row_scale[m] * col_scale[n] + bias[n], then CELU(alpha)
// when alpha > 0: coarse (2M, N) and fine (M, N) int32 (fine empty: a one-plane weight, no term);
// col_scale and bias (N,) float32 or empty.
Tensor combine(const Tensor& coarse_in, const Tensor& fine_in, const Tensor& row_scale_in,
               const Tensor& col_scale_in, const Tensor& bias_in, double alpha) {
  TORCH_CHECK(coarse_in.scalar_type() == at::kInt && fine_in.scalar_type() == at::kInt, "combine: int32 products");
  auto coarse = coarse_in.contiguous();
  auto fine = fine_in.contiguous();
  auto row_scale = row_scale_in.contiguous();
  auto col_scale = col_scale_in.contiguous();
  auto bias = bias_in.contiguous();
  const int64_t m = coarse.size(0) / 2, n = coarse.size(1);
  const bool has_fine = fine.numel() > 0;
  TORCH_CHECK(!has_fine || (fine.size(0) == m && fine.size(1) == n), "combine: fine must be (M, N)");
  const bool has_col = col_scale.numel() == n, has_bias = bias.numel() == n;
  auto out = at::empty({m, n}, row_scale.options());
  const int32_t* cp = coarse.data_ptr<int32_t>();
  const int32_t* fp = has_fine ? fine.data_ptr<int32_t>() : nullptr;
  const float* rs = row_scale.data_ptr<float>();
  const float* cs = has_col ? col_scale.data_ptr<float>() : nullptr;
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const float a = static_cast<float>(alpha);
  at::parallel_for(0, m, 8, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      combine_row(cp + i * n, cp + (m + i) * n, fp ? fp + i * n : nullptr, rs[i], cs, bp, a, op + i * n, n);
    }
  });
  return out;
}

// Float32 (q - zero) * scale / col of int8 codes q (N, K) in groups of `group` columns: scale and
// zero (N, K / group) (zero empty: symmetric), col (members, K) or empty, row r belonging to member
// r / (N / members). One pass, for the exact mode's per-call weights.
Tensor dequantize(const Tensor& q_in, const Tensor& scale_in, const Tensor& zero_in, const Tensor& col_in, int64_t group) {
  TORCH_CHECK(q_in.scalar_type() == at::kChar && q_in.dim() == 2, "dequantize: codes must be (N, K) int8");
  auto q = q_in.contiguous();
  const int64_t n = q.size(0), k = q.size(1), groups = k / group;
  // scales and zero points broadcast over rows (per-tensor formats store one)
  auto scale = scale_in.to(at::kFloat).expand({n, groups}).contiguous();
  const bool asym = zero_in.numel() > 0;
  auto zero = asym ? zero_in.to(at::kFloat).expand({n, groups}).contiguous() : scale;
  const bool has_col = col_in.numel() > 0;
  auto col = has_col ? at::reciprocal(col_in.to(at::kFloat)).contiguous() : scale;
  const int64_t members = has_col ? col.size(0) : 1, rows_per_member = n / members;
  auto out = at::empty({n, k}, scale.options());
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = asym ? zero.data_ptr<float>() : nullptr;
  const float* cp = has_col ? col.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      dequantize_row(qp + r * k, sp + r * groups, zp ? zp + r * groups : nullptr,
                     cp ? cp + (r / rows_per_member) * k : nullptr, op + r * k, k, group);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(nnpq_int8, m) {
  m.def("split_rows(Tensor x, Tensor col) -> (Tensor, Tensor)", split_rows);
  m.def("combine(Tensor coarse, Tensor fine, Tensor row_scale, Tensor col_scale, Tensor bias, float alpha) -> Tensor",
        combine);
  m.def("dequantize(Tensor q, Tensor scale, Tensor zero, Tensor col, int group) -> Tensor", dequantize);
}
