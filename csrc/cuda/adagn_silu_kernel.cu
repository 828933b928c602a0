// CUDA kernels of cdal::adagn_silu (torch-free; see kernels.h).
// 1) one block per (sample, group): Welford statistics of x + bias in float32;
// 2) one elementwise pass: y = silu(x * scale + shift), scale/shift folded per (sample, channel).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "block_reduce.cuh"
#include "kernels.h"

namespace cdal_cuda {
namespace {

template <typename T>
__device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

struct Welford {
  float n, mean, m2;
};

// Shuffles a Welford triple field by field, so block_reduce can combine triples.
__device__ __forceinline__ Welford shfl_down(Welford w, int offset) {
  return {cdal_cuda::shfl_down(w.n, offset), cdal_cuda::shfl_down(w.mean, offset),
          cdal_cuda::shfl_down(w.m2, offset)};
}

__device__ __forceinline__ Welford merge(Welford a, Welford b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float d = b.mean - a.mean;
  const float wb = b.n / n;
  return {n, a.mean + d * wb, a.m2 + b.m2 + d * d * a.n * wb};
}

struct MergeOp {
  __device__ __forceinline__ Welford operator()(Welford a, Welford b) const { return merge(a, b); }
};

template <typename T, int THREADS>
__global__ void stats_kernel(const T* __restrict__ x, const float* __restrict__ bias, float* __restrict__ stats,
                             int64_t C, int64_t HW, int64_t G, float eps, bool channels_last) {
  const int64_t ng = blockIdx.x;
  const int64_t n = ng / G, c0 = (ng % G) * (C / G), Cg = C / G;
  const int64_t count = Cg * HW;
  Welford w{0.f, 0.f, 0.f};
  for (int64_t e = threadIdx.x; e < count; e += THREADS) {
    int64_t c, idx;
    if (!channels_last) {
      c = c0 + e / HW;
      idx = (n * C + c) * HW + e % HW;
    } else {
      c = c0 + e % Cg;
      idx = (n * HW + e / Cg) * C + c;
    }
    const float v = to_f(x[idx]) + (bias ? bias[n * C + c] : 0.f);
    w.n += 1.f;
    const float d = v - w.mean;
    w.mean += d / w.n;
    w.m2 += d * (v - w.mean);
  }
  __shared__ Welford warps[THREADS / kWarpSize];
  w = block_reduce<THREADS>(w, MergeOp{}, Welford{0.f, 0.f, 0.f}, warps);
  if (threadIdx.x == 0) {
    stats[2 * ng] = w.mean;
    stats[2 * ng + 1] = rsqrtf(fmaxf(w.m2 / w.n, 0.f) + eps);
  }
}

template <typename T>
__global__ void apply_kernel(const T* __restrict__ x, const float* __restrict__ gamma, const float* __restrict__ beta,
                             const float* __restrict__ bias, const float* __restrict__ stats, T* __restrict__ y,
                             int64_t total, int64_t C, int64_t HW, int64_t G, bool channels_last) {
  const int64_t Cg = C / G;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t n, c;
    if (!channels_last) {
      c = (i / HW) % C;
      n = i / (HW * C);
    } else {
      c = i % C;
      n = i / (HW * C);
    }
    const int64_t ng = n * G + c / Cg;
    const float mean = stats[2 * ng], rstd = stats[2 * ng + 1];
    const float g = gamma[n * C + c];
    const float b = bias ? bias[n * C + c] : 0.f;
    const float v = (to_f(x[i]) + b - mean) * rstd * g + beta[n * C + c];
    y[i] = from_f<T>(v / (1.f + __expf(-v)));
  }
}

template <typename T>
cudaError_t launch(const void* x, const float* gamma, const float* beta, const float* bias, void* y, float* stats,
                   int64_t N, int64_t C, int64_t HW, int64_t G, float eps, bool channels_last, cudaStream_t s) {
  constexpr int THREADS = 256;
  const T* xt = static_cast<const T*>(x);
  stats_kernel<T, THREADS><<<static_cast<unsigned>(N * G), THREADS, 0, s>>>(xt, bias, stats, C, HW, G, eps,
                                                                           channels_last);
  const int64_t total = N * C * HW;
  const int64_t blocks = (total + THREADS - 1) / THREADS;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  apply_kernel<T><<<grid, THREADS, 0, s>>>(xt, gamma, beta, bias, stats, static_cast<T*>(y), total, C, HW, G,
                                           channels_last);
  return cudaGetLastError();
}

}  // namespace

cudaError_t adagn_silu(const void* x, const float* gamma, const float* beta, const float* bias, void* y,
                       float* stats, int64_t N, int64_t C, int64_t HW, int64_t groups, float eps,
                       bool channels_last, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32:
      return launch<float>(x, gamma, beta, bias, y, stats, N, C, HW, groups, eps, channels_last, stream);
    case DType::Float16:
      return launch<__half>(x, gamma, beta, bias, y, stats, N, C, HW, groups, eps, channels_last, stream);
    case DType::BFloat16:
      return launch<__nv_bfloat16>(x, gamma, beta, bias, y, stats, N, C, HW, groups, eps, channels_last, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cdal_cuda
