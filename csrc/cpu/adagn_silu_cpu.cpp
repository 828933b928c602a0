// CPU kernel of cdal::adagn_silu: SiLU(gamma * GroupNorm(x + bias) + beta) in one fused kernel.
// Statistics are accumulated in double (float32 inputs keep ~1e-7 relative accuracy); the output
// is computed as silu(x * scale + shift) with per-(sample, channel) scale and shift folded once.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "../ops.h"

namespace cdal {
namespace {

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

template <typename scalar_t>
void adagn_kernel(const scalar_t* x, const float* gamma, const float* beta, const float* bias, scalar_t* y,
                  int64_t N, int64_t C, int64_t HW, int64_t G, double eps, bool channels_last) {
  const int64_t Cg = C / G;
  const double count = static_cast<double>(Cg * HW);
  at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / G, c0 = (ng % G) * Cg;
      double sum = 0.0, sumsq = 0.0;
      if (!channels_last) {
        for (int64_t c = c0; c < c0 + Cg; ++c) {
          const double b = bias ? bias[n * C + c] : 0.0;
          const scalar_t* p = x + (n * C + c) * HW;
          // Accumulate (x - pivot) in float lanes: the pivot (first value) removes the mean's
          // magnitude, so float partial sums keep full precision; totals are combined in double.
          const float pivot = static_cast<float>(p[0]);
          float s = 0.f, ss = 0.f;
#pragma omp simd reduction(+ : s, ss)
          for (int64_t i = 0; i < HW; ++i) {
            const float v = static_cast<float>(p[i]) - pivot;
            s += v;
            ss += v * v;
          }
          // shift back: sum (v + d) and sum (v + d)^2 with d = pivot + b
          const double d = static_cast<double>(pivot) + b;
          sum += s + d * HW;
          sumsq += ss + 2.0 * d * s + d * d * HW;
        }
      } else {
        for (int64_t i = 0; i < HW; ++i) {
          const scalar_t* p = x + (n * HW + i) * C;
          for (int64_t c = c0; c < c0 + Cg; ++c) {
            const double v = static_cast<double>(static_cast<float>(p[c])) + (bias ? bias[n * C + c] : 0.0);
            sum += v;
            sumsq += v * v;
          }
        }
      }
      const double mean = sum / count;
      const double var = std::max(sumsq / count - mean * mean, 0.0);
      const double rstd = 1.0 / std::sqrt(var + eps);
      for (int64_t c = c0; c < c0 + Cg; ++c) {
        const double b = bias ? bias[n * C + c] : 0.0;
        const float scale = static_cast<float>(gamma[n * C + c] * rstd);
        const float shift = static_cast<float>(beta[n * C + c] + (b - mean) * gamma[n * C + c] * rstd);
        if (!channels_last) {
          const scalar_t* p = x + (n * C + c) * HW;
          scalar_t* q = y + (n * C + c) * HW;
          if constexpr (std::is_same_v<scalar_t, float>) {
            using Vec = at::vec::Vectorized<float>;
            const Vec vs(scale), vh(shift), one(1.f);
            int64_t i = 0;
            for (; i + Vec::size() <= HW; i += Vec::size()) {
              const Vec v = Vec::loadu(p + i) * vs + vh;
              (v / (one + v.neg().exp())).store(q + i);
            }
            for (; i < HW; ++i) q[i] = silu(p[i] * scale + shift);
          } else {
            for (int64_t i = 0; i < HW; ++i) q[i] = static_cast<scalar_t>(silu(static_cast<float>(p[i]) * scale + shift));
          }
        } else {
          for (int64_t i = 0; i < HW; ++i) {
            const int64_t k = (n * HW + i) * C + c;
            y[k] = static_cast<scalar_t>(silu(static_cast<float>(x[k]) * scale + shift));
          }
        }
      }
    }
  });
}

at::Tensor adagn_silu_cpu(const at::Tensor& x_in, const at::Tensor& gamma, const at::Tensor& beta,
                          const std::optional<at::Tensor>& bias, int64_t groups, double eps) {
  const AdagnInputs in = prepare_adagn(x_in, gamma, beta, bias, groups);
  at::Tensor y = at::empty_like(in.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "adagn_silu_cpu", [&] {
    adagn_kernel<scalar_t>(in.x.data_ptr<scalar_t>(), in.gamma.data_ptr<float>(), in.beta.data_ptr<float>(),
                           in.bias_ptr(), y.data_ptr<scalar_t>(), in.N, in.C, in.HW, groups, eps, in.channels_last);
  });
  return y;
}

}  // namespace
}  // namespace cdal

TORCH_LIBRARY_IMPL(cdal, CPU, m) { m.impl("adagn_silu", &cdal::adagn_silu_cpu); }
