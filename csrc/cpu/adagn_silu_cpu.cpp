// CPU kernel of cdal::adagn_silu: SiLU(gamma * GroupNorm(x + bias) + beta) in one fused kernel.
//
// Work is split per (sample, group) and per layout into two steps:
//  * statistics: mean and 1/std of x + bias over the group's channels and pixels, accumulated in
//    double (float32 inputs keep ~1e-7 relative accuracy against a float64 reference);
//  * apply: y = silu(x * scale + shift) with scale = gamma * rstd and
//    shift = beta + (bias - mean) * gamma * rstd folded once per (sample, channel), so the
//    per-pixel work is one multiply-add and the SiLU.
// NCHW reads each channel's pixels contiguously; NHWC (channels_last) reads each pixel's channels.
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

// Sizes and per-(sample, channel) parameters of one call, shared by the four step functions.
struct AdagnShape {
  int64_t C, HW, G, Cg;
};

struct GroupStats {
  double mean, rstd;
};

inline GroupStats finish_stats(double sum, double sumsq, double count, double eps) {
  const double mean = sum / count;
  const double var = std::max(sumsq / count - mean * mean, 0.0);  // clamp: rounding can make it negative
  return {mean, 1.0 / std::sqrt(var + eps)};
}

// NCHW statistics. Each channel's HW values are summed in float SIMD lanes after subtracting a
// pivot (the channel's first value): the pivot removes the mean's magnitude, so float partial
// sums of (x - pivot) and its square keep full precision; each channel's totals are shifted back
// by d = pivot + bias and combined in double: sum (v + d) = s + d HW, sum (v + d)^2 = ss + 2 d s + d^2 HW.
template <typename scalar_t>
GroupStats stats_nchw(const scalar_t* x, const float* bias, int64_t n, int64_t c0, const AdagnShape& s, double eps) {
  double sum = 0.0, sumsq = 0.0;
  for (int64_t c = c0; c < c0 + s.Cg; ++c) {
    const double b = bias ? bias[n * s.C + c] : 0.0;
    const scalar_t* p = x + (n * s.C + c) * s.HW;
    const float pivot = static_cast<float>(p[0]);
    float sf = 0.f, ssf = 0.f;
#pragma omp simd reduction(+ : sf, ssf)
    for (int64_t i = 0; i < s.HW; ++i) {
      const float v = static_cast<float>(p[i]) - pivot;
      sf += v;
      ssf += v * v;
    }
    const double d = static_cast<double>(pivot) + b;
    sum += sf + d * s.HW;
    sumsq += ssf + 2.0 * d * sf + d * d * s.HW;
  }
  return finish_stats(sum, sumsq, static_cast<double>(s.Cg * s.HW), eps);
}

// NHWC statistics: a group's channels are strided by C per pixel, too short for SIMD lanes to pay
// off, so every value (x + bias) is accumulated directly in double.
template <typename scalar_t>
GroupStats stats_nhwc(const scalar_t* x, const float* bias, int64_t n, int64_t c0, const AdagnShape& s, double eps) {
  double sum = 0.0, sumsq = 0.0;
  for (int64_t i = 0; i < s.HW; ++i) {
    const scalar_t* p = x + (n * s.HW + i) * s.C;
    for (int64_t c = c0; c < c0 + s.Cg; ++c) {
      const double v = static_cast<double>(static_cast<float>(p[c])) + (bias ? bias[n * s.C + c] : 0.0);
      sum += v;
      sumsq += v * v;
    }
  }
  return finish_stats(sum, sumsq, static_cast<double>(s.Cg * s.HW), eps);
}

// Folded per-(sample, channel) affine of the normalised, modulated value; computed in double and
// rounded to float once, so the per-pixel multiply-add is float.
struct ChannelAffine {
  float scale, shift;
};

inline ChannelAffine channel_affine(const float* gamma, const float* beta, const float* bias, int64_t nc,
                                    const GroupStats& st) {
  const double b = bias ? bias[nc] : 0.0;
  return {static_cast<float>(gamma[nc] * st.rstd),
          static_cast<float>(beta[nc] + (b - st.mean) * gamma[nc] * st.rstd)};
}

// NCHW apply: one contiguous run of HW values per channel; float32 uses at::vec lanes (SiLU as
// v / (1 + exp(-v)) on vectors), half types compute in float and round once on store.
template <typename scalar_t>
void apply_nchw(const scalar_t* x, scalar_t* y, const float* gamma, const float* beta, const float* bias, int64_t n,
                int64_t c0, const AdagnShape& s, const GroupStats& st) {
  for (int64_t c = c0; c < c0 + s.Cg; ++c) {
    const ChannelAffine a = channel_affine(gamma, beta, bias, n * s.C + c, st);
    const scalar_t* p = x + (n * s.C + c) * s.HW;
    scalar_t* q = y + (n * s.C + c) * s.HW;
    if constexpr (std::is_same_v<scalar_t, float>) {
      using Vec = at::vec::Vectorized<float>;
      const Vec vs(a.scale), vh(a.shift), one(1.f);
      int64_t i = 0;
      for (; i + Vec::size() <= s.HW; i += Vec::size()) {
        const Vec v = Vec::loadu(p + i) * vs + vh;
        (v / (one + v.neg().exp())).store(q + i);
      }
      for (; i < s.HW; ++i) q[i] = silu(p[i] * a.scale + a.shift);
    } else {
      for (int64_t i = 0; i < s.HW; ++i) q[i] = static_cast<scalar_t>(silu(static_cast<float>(p[i]) * a.scale + a.shift));
    }
  }
}

// NHWC apply: the channel's values are C apart; scalar float math, rounded once on store.
template <typename scalar_t>
void apply_nhwc(const scalar_t* x, scalar_t* y, const float* gamma, const float* beta, const float* bias, int64_t n,
                int64_t c0, const AdagnShape& s, const GroupStats& st) {
  for (int64_t c = c0; c < c0 + s.Cg; ++c) {
    const ChannelAffine a = channel_affine(gamma, beta, bias, n * s.C + c, st);
    for (int64_t i = 0; i < s.HW; ++i) {
      const int64_t k = (n * s.HW + i) * s.C + c;
      y[k] = static_cast<scalar_t>(silu(static_cast<float>(x[k]) * a.scale + a.shift));
    }
  }
}

template <typename scalar_t>
void adagn_kernel(const scalar_t* x, const float* gamma, const float* beta, const float* bias, scalar_t* y,
                  int64_t N, int64_t C, int64_t HW, int64_t G, double eps, bool channels_last) {
  const AdagnShape s{C, HW, G, C / G};
  at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / G, c0 = (ng % G) * s.Cg;
      if (channels_last) {
        apply_nhwc(x, y, gamma, beta, bias, n, c0, s, stats_nhwc(x, bias, n, c0, s, eps));
      } else {
        apply_nchw(x, y, gamma, beta, bias, n, c0, s, stats_nchw(x, bias, n, c0, s, eps));
      }
    }
  });
}

at::Tensor adagn_silu_cpu(const at::Tensor& x_in, const at::Tensor& gamma, const at::Tensor& beta,
                          const std::optional<at::Tensor>& bias, int64_t groups, double eps) {
  const AdagnInputs in = prepare_adagn(x_in, gamma, beta, bias, groups);
  at::Tensor y = at::empty_like(in.x);
  if (y.numel() == 0) return y;  // same early return as the CUDA glue (no statistics of empty groups)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "adagn_silu_cpu", [&] {
    adagn_kernel<scalar_t>(in.x.data_ptr<scalar_t>(), in.gamma.data_ptr<float>(), in.beta.data_ptr<float>(),
                           in.bias_ptr(), y.data_ptr<scalar_t>(), in.N, in.C, in.HW, groups, eps, in.channels_last);
  });
  return y;
}

}  // namespace
}  // namespace cdal

TORCH_LIBRARY_IMPL(cdal, CPU, m) { m.impl("adagn_silu", &cdal::adagn_silu_cpu); }
