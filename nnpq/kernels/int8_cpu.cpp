// Fused passes around torch._int_mm for the fast mode's layer 0 on the CPU (nnpq.kernels.cpu):
// splitting rows into two INT8 planes, and combining the three int32 products with the scales,
// the bias and CELU. Each replaces a chain of elementwise torch ops with one pass over memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

using at::Tensor;

namespace {

constexpr float kInt8Max = 127.0f;
constexpr float kPlaneRatio = 254.0f;

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
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* row = xp + i * k;
      float top = 0.0f;
      for (int64_t j = 0; j < k; ++j) top = std::max(top, std::fabs(row[j] * cl[j]));
      const float s = std::max(top, 1e-30f) / kInt8Max;
      const float inv = 1.0f / s;
      sp[i] = s;
      int8_t* q1 = cp + i * k;
      int8_t* q2 = cp + (m + i) * k;
      for (int64_t j = 0; j < k; ++j) {
        const float t = std::min(std::max(row[j] * cl[j] * inv, -kInt8Max), kInt8Max);
        const float a = std::nearbyint(t);
        q1[j] = static_cast<int8_t>(a);
        q2[j] = static_cast<int8_t>(std::nearbyint((t - a) * kPlaneRatio));
      }
    }
  });
  return {codes, scale};
}

// (coarse[:M] + (coarse[M:] + fine) / 254) * row_scale[m] * col_scale[n] + bias[n], then CELU(alpha)
// when alpha > 0: coarse (2M, N) and fine (M, N) int32; col_scale and bias (N,) float32 or empty.
Tensor combine(const Tensor& coarse_in, const Tensor& fine_in, const Tensor& row_scale_in,
               const Tensor& col_scale_in, const Tensor& bias_in, double alpha) {
  TORCH_CHECK(coarse_in.scalar_type() == at::kInt && fine_in.scalar_type() == at::kInt, "combine: int32 products");
  auto coarse = coarse_in.contiguous();
  auto fine = fine_in.contiguous();
  auto row_scale = row_scale_in.contiguous();
  auto col_scale = col_scale_in.contiguous();
  auto bias = bias_in.contiguous();
  const int64_t m = fine.size(0), n = fine.size(1);
  TORCH_CHECK(coarse.size(0) == 2 * m && coarse.size(1) == n, "combine: coarse must be (2M, N)");
  const bool has_col = col_scale.numel() == n, has_bias = bias.numel() == n;
  auto out = at::empty({m, n}, row_scale.options());
  const int32_t* cp = coarse.data_ptr<int32_t>();
  const int32_t* fp = fine.data_ptr<int32_t>();
  const float* rs = row_scale.data_ptr<float>();
  const float* cs = has_col ? col_scale.data_ptr<float>() : nullptr;
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const float a = static_cast<float>(alpha);
  const float inv_ratio = 1.0f / kPlaneRatio;
  at::parallel_for(0, m, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int32_t* c1 = cp + i * n;
      const int32_t* c2 = cp + (m + i) * n;
      const int32_t* f = fp + i * n;
      float* o = op + i * n;
      const float r = rs[i];
      for (int64_t j = 0; j < n; ++j) {
        float v = (static_cast<float>(c1[j]) + static_cast<float>(c2[j] + f[j]) * inv_ratio) * r;
        if (cs) v *= cs[j];
        if (bp) v += bp[j];
        if (a > 0.0f && v < 0.0f) v = a * std::expm1(v / a);
        o[j] = v;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(nnpq_int8, m) {
  m.def("split_rows(Tensor x, Tensor col) -> (Tensor, Tensor)", split_rows);
  m.def("combine(Tensor coarse, Tensor fine, Tensor row_scale, Tensor col_scale, Tensor bias, float alpha) -> Tensor",
        combine);
}
