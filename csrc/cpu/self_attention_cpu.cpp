// CPU kernel of cdal::self_attention. GroupNorm and the 1x1 projections run as ATen GEMMs; the
// attention core is fused per block of queries: scores, softmax and the weighted sum of values
// of 32 queries at a time, so the HW x HW score matrix is never materialised.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../ops.h"

namespace cdal {
namespace {

// qkv: (N, HW, 3C) float contiguous -> out (N, HW, C) float. Work is split into blocks of
// kBlock queries; a block's scores (kBlock x HW) live in a per-task buffer that stays in cache.
constexpr int64_t kBlock = 32;

void attention_core(const at::Tensor& qkv, at::Tensor& out, int64_t N, int64_t HW, int64_t C) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(C));
  const int64_t blocks = (HW + kBlock - 1) / kBlock;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / blocks, q0 = (t % blocks) * kBlock, q1 = std::min(q0 + kBlock, HW);
      const at::Tensor tok = qkv[n];                                   // (HW, 3C)
      const at::Tensor q = tok.slice(0, q0, q1).slice(1, 0, C);
      const at::Tensor k = tok.slice(1, C, 2 * C);
      const at::Tensor v = tok.slice(1, 2 * C, 3 * C);
      at::Tensor s = at::mm(q, k.t()).mul_(scale);                     // (block, HW), in cache
      s = at::_softmax(s, 1, false);
      const at::Tensor o = at::mm(s, v).contiguous();                 // (block, C)
      // raw copy: worker threads may run outside the caller's InferenceMode
      std::memcpy(out.data_ptr<float>() + (n * HW + q0) * C, o.data_ptr<float>(), sizeof(float) * (q1 - q0) * C);
    }
  });
}

at::Tensor self_attention_cpu(const at::Tensor& x, const at::Tensor& norm_w, const at::Tensor& norm_b,
                              const at::Tensor& qkv_w, const std::optional<at::Tensor>& qkv_b,
                              const at::Tensor& proj_w, const std::optional<at::Tensor>& proj_b, int64_t groups,
                              double eps) {
  check_attention_args(x, norm_w, norm_b, qkv_w, qkv_b, proj_w, proj_b, groups);
  if (x.numel() == 0) return at::empty_like(x);  // same early return as the CUDA glue
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const at::Tensor qkv = attention_qkv_tokens(x, norm_w, norm_b, qkv_w, qkv_b, groups, eps).to(at::kFloat).contiguous();
  at::Tensor attn = at::empty({N, HW, C}, qkv.options());
  attention_core(qkv, attn, N, HW, C);
  return attention_output(x, attn.to(x.scalar_type()), proj_w, proj_b);
}

}  // namespace
}  // namespace cdal

TORCH_LIBRARY_IMPL(cdal, CPU, m) { m.impl("self_attention", &cdal::self_attention_cpu); }
