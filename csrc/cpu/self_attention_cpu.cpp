// CPU kernel of cdal::self_attention. GroupNorm and the 1x1 projections run as ATen GEMMs; the
// attention core is fused: each query row computes its scores, softmax and weighted sum of values
// in a private buffer of HW floats, so the HW x HW score matrix is never materialised.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../ops.h"

namespace cdal {
namespace {

// qkv: (N, HW, 3C) float contiguous -> out (N, HW, C) float.
void attention_core(const float* qkv, float* out, int64_t N, int64_t HW, int64_t C) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(C));
  const int64_t row = 3 * C;
  at::parallel_for(0, N * HW, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(HW);
    std::vector<float> acc(C);
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / HW;
      const float* q = qkv + nq * row;
      const float* base = qkv + n * HW * row;
      float mx = -INFINITY;
      for (int64_t j = 0; j < HW; ++j) {
        const float* k = base + j * row + C;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t c = 0; c < C; ++c) s += q[c] * k[c];
        s *= scale;
        scores[j] = s;
        mx = std::max(mx, s);
      }
      float denom = 0.f;
      for (int64_t j = 0; j < HW; ++j) {
        scores[j] = std::exp(scores[j] - mx);
        denom += scores[j];
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < HW; ++j) {
        const float p = scores[j];
        const float* v = base + j * row + 2 * C;
        float* a = acc.data();
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) a[c] += p * v[c];
      }
      float* o = out + nq * C;
      const float inv = 1.f / denom;
      for (int64_t c = 0; c < C; ++c) o[c] = acc[c] * inv;
    }
  });
}

at::Tensor self_attention_cpu(const at::Tensor& x, const at::Tensor& norm_w, const at::Tensor& norm_b,
                              const at::Tensor& qkv_w, const std::optional<at::Tensor>& qkv_b,
                              const at::Tensor& proj_w, const std::optional<at::Tensor>& proj_b, int64_t groups,
                              double eps) {
  check_attention_args(x, norm_w, norm_b, qkv_w, qkv_b, proj_w, proj_b, groups);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const at::Tensor qkv = attention_qkv_tokens(x, norm_w, norm_b, qkv_w, qkv_b, groups, eps).to(at::kFloat).contiguous();
  at::Tensor attn = at::empty({N, HW, C}, qkv.options());
  attention_core(qkv.data_ptr<float>(), attn.data_ptr<float>(), N, HW, C);
  return attention_output(x, attn.to(x.scalar_type()), proj_w, proj_b);
}

}  // namespace
}  // namespace cdal

TORCH_LIBRARY_IMPL(cdal, CPU, m) { m.impl("self_attention", &cdal::self_attention_cpu); }
