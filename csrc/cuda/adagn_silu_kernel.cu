// CUDA kernels of cdal::adagn_silu (torch-free; see kernels.h).
// 1) statistics of x + bias per (sample, group) in float32 (Welford):
//    NCHW: one block per (sample, group) reads the group's contiguous Cg x HW run;
//    NHWC: blocks of (pixel chunk, sample) read whole pixels (all C channels, contiguous, so every
//    cache line is used in full), each thread keeps one channel, partial results per group are
//    merged by a second small kernel;
// 2) scale/shift folded once per (sample, channel);
// 3) y = silu(x * scale + shift) on a 2-D grid: y = (sample, channel) plane (NCHW) or sample
//    (NHWC), x = a 32-bit index inside it. No 64-bit divide or modulo per element.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "block_reduce.cuh"
#include "kernels.h"

namespace cdal_cuda {
namespace {

constexpr int THREADS = 256;
constexpr int64_t MAX_GRID_Y = 65535;        // CUDA's limit on gridDim.y
constexpr int64_t APPLY_BLOCKS_PER_PLANE = 32;   // NCHW: blocks across one (n, c) plane
constexpr int64_t APPLY_BLOCKS_PER_SAMPLE = 1024;  // NHWC: blocks across one sample
constexpr int64_t CL_PIXELS_PER_BLOCK = 2048;  // NHWC statistics: pixels per partial block
// the largest grid-stride step of the apply kernels, added to a 32-bit index below kAdagnMaxPlane
static_assert(kAdagnMaxPlane + APPLY_BLOCKS_PER_SAMPLE * THREADS < (1LL << 32) &&
                  kAdagnMaxPlane + APPLY_BLOCKS_PER_PLANE * THREADS < (1LL << 32),
              "a grid-stride index could wrap past 2^32");

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

__device__ __forceinline__ Welford merge(Welford a, Welford b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float d = b.mean - a.mean;
  const float wb = b.n / n;
  return {n, a.mean + d * wb, a.m2 + b.m2 + d * d * a.n * wb};
}

__device__ __forceinline__ void push(Welford& w, float v) {
  w.n += 1.f;
  const float d = v - w.mean;
  w.mean += d / w.n;
  w.m2 += d * (v - w.mean);
}

__device__ __forceinline__ void write_stats(float* stats, int64_t ng, Welford w, float eps) {
  stats[2 * ng] = w.mean;
  stats[2 * ng + 1] = rsqrtf(fmaxf(w.m2 / w.n, 0.f) + eps);
}

// Shuffles a Welford triple field by field, so block_reduce can combine triples.
__device__ __forceinline__ Welford shfl_down(Welford w, int offset) {
  return {cdal_cuda::shfl_down(w.n, offset), cdal_cuda::shfl_down(w.mean, offset),
          cdal_cuda::shfl_down(w.m2, offset)};
}

struct MergeOp {
  __device__ __forceinline__ Welford operator()(Welford a, Welford b) const { return merge(a, b); }
};

// Every thread of the block calls it; thread 0 writes mean and 1 / std of the (sample, group).
__device__ __forceinline__ void reduce_and_write(Welford w, float* stats, int64_t ng, float eps) {
  __shared__ Welford warps[THREADS / kWarpSize];
  w = block_reduce<THREADS>(w, MergeOp{}, Welford{0.f, 0.f, 0.f}, warps);
  if (threadIdx.x == 0) write_stats(stats, ng, w, eps);
}

// NCHW: block = (sample, group); the group's channels are contiguous planes of HW values.
template <typename T>
__global__ void stats_nchw_kernel(const T* __restrict__ x, const float* __restrict__ bias, float* __restrict__ stats,
                                  int64_t C, uint32_t HW, int64_t G, float eps) {
  const int64_t ng = blockIdx.x;
  const int64_t n = ng / G, Cg = C / G, c0 = (ng % G) * Cg;
  Welford w{0.f, 0.f, 0.f};
  for (int64_t k = 0; k < Cg; ++k) {
    const T* plane = x + (n * C + c0 + k) * static_cast<int64_t>(HW);
    const float b = bias ? bias[n * C + c0 + k] : 0.f;
    for (uint32_t j = threadIdx.x; j < HW; j += THREADS) push(w, to_f(plane[j]) + b);
  }
  reduce_and_write(w, stats, ng, eps);
}

// NHWC, C divides THREADS: block (chunk, sample) reads pixels [chunk * P, (chunk + 1) * P) whole;
// thread t always sees channel t % C. Writes one partial Welford triple per (sample, chunk, group).
template <typename T>
__global__ void stats_nhwc_partial_kernel(const T* __restrict__ x, const float* __restrict__ bias,
                                          float* __restrict__ partial, uint32_t C, uint32_t HW, uint32_t G) {
  const uint32_t chunk = blockIdx.x, chunks = gridDim.x;
  const int64_t n = blockIdx.y;
  const uint32_t c = threadIdx.x % C, pixel_lanes = THREADS / C;
  const T* xs = x + n * static_cast<int64_t>(HW) * C;
  const float b = bias ? bias[n * C + c] : 0.f;
  const uint32_t begin = chunk * static_cast<uint32_t>(CL_PIXELS_PER_BLOCK);
  const int64_t stop = static_cast<int64_t>(begin) + CL_PIXELS_PER_BLOCK;
  const uint32_t end = static_cast<uint32_t>(stop < HW ? stop : HW);
  Welford w{0.f, 0.f, 0.f};
  for (uint32_t p = begin + threadIdx.x / C; p < end; p += pixel_lanes) push(w, to_f(xs[p * C + c]) + b);
  __shared__ Welford per_thread[THREADS];
  per_thread[threadIdx.x] = w;
  __syncthreads();
  if (threadIdx.x < G) {
    const uint32_t g = threadIdx.x, Cg = C / G;
    Welford acc{0.f, 0.f, 0.f};
    for (uint32_t lane = 0; lane < pixel_lanes; ++lane)
      for (uint32_t k = 0; k < Cg; ++k) acc = merge(acc, per_thread[lane * C + g * Cg + k]);
    float* out = partial + 3 * ((n * chunks + chunk) * G + g);
    out[0] = acc.n;
    out[1] = acc.mean;
    out[2] = acc.m2;
  }
}

__global__ void stats_merge_kernel(const float* __restrict__ partial, float* __restrict__ stats, int64_t NG,
                                   int64_t G, uint32_t chunks, float eps) {
  const int64_t ng = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (ng >= NG) return;
  const int64_t n = ng / G, g = ng % G;
  Welford w{0.f, 0.f, 0.f};
  for (uint32_t k = 0; k < chunks; ++k) {
    const float* p = partial + 3 * ((n * chunks + k) * G + g);
    w = merge(w, Welford{p[0], p[1], p[2]});
  }
  write_stats(stats, ng, w, eps);
}

// NHWC, any C: block = (sample, group), each thread reads its pixels' Cg contiguous channels.
template <typename T>
__global__ void stats_nhwc_generic_kernel(const T* __restrict__ x, const float* __restrict__ bias,
                                          float* __restrict__ stats, int64_t C, uint32_t HW, int64_t G, float eps) {
  const int64_t ng = blockIdx.x;
  const int64_t n = ng / G, Cg = C / G, c0 = (ng % G) * Cg;
  const T* xs = x + n * static_cast<int64_t>(HW) * C + c0;
  Welford w{0.f, 0.f, 0.f};
  for (uint32_t p = threadIdx.x; p < HW; p += THREADS)
    for (int64_t k = 0; k < Cg; ++k) push(w, to_f(xs[p * C + k]) + (bias ? bias[n * C + c0 + k] : 0.f));
  reduce_and_write(w, stats, ng, eps);
}

// scale = rstd * gamma, shift = beta + (bias - mean) * scale, once per (sample, channel).
__global__ void fold_kernel(const float* __restrict__ stats, const float* __restrict__ gamma,
                            const float* __restrict__ beta, const float* __restrict__ bias,
                            float* __restrict__ scale, float* __restrict__ shift, int64_t NC, int64_t C, int64_t G) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= NC) return;
  const int64_t ng = (i / C) * G + (i % C) / (C / G);
  const float s = stats[2 * ng + 1] * gamma[i];
  scale[i] = s;
  shift[i] = beta[i] + ((bias ? bias[i] : 0.f) - stats[2 * ng]) * s;
}

__device__ __forceinline__ float silu(float v) { return v / (1.f + __expf(-v)); }

template <typename T>
__global__ void apply_nchw_kernel(const T* __restrict__ x, const float* __restrict__ scale,
                                  const float* __restrict__ shift, T* __restrict__ y, int64_t planes, uint32_t HW) {
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const float s = scale[plane], h = shift[plane];
    const T* xp = x + plane * static_cast<int64_t>(HW);
    T* yp = y + plane * static_cast<int64_t>(HW);
    for (uint32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < HW; j += gridDim.x * blockDim.x)
      yp[j] = from_f<T>(silu(to_f(xp[j]) * s + h));
  }
}

template <typename T>
__global__ void apply_nhwc_kernel(const T* __restrict__ x, const float* __restrict__ scale,
                                  const float* __restrict__ shift, T* __restrict__ y, int64_t N, uint32_t C,
                                  uint32_t HWC) {
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const float* sn = scale + n * C;
    const float* hn = shift + n * C;
    const T* xs = x + n * static_cast<int64_t>(HWC);
    T* ys = y + n * static_cast<int64_t>(HWC);
    for (uint32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < HWC; j += gridDim.x * blockDim.x) {
      const uint32_t c = j % C;
      ys[j] = from_f<T>(silu(to_f(xs[j]) * sn[c] + hn[c]));
    }
  }
}

unsigned blocks_for(int64_t work, int64_t cap) {
  const int64_t b = (work + THREADS - 1) / THREADS;
  return static_cast<unsigned>(b < 1 ? 1 : (b < cap ? b : cap));
}

// the partial-statistics path needs C | THREADS (a fixed channel per thread) and N within gridDim.y
bool nhwc_partial_fits(int64_t N, int64_t C) { return C <= THREADS && THREADS % C == 0 && N <= MAX_GRID_Y; }

int64_t nhwc_chunks(int64_t HW) { return (HW + CL_PIXELS_PER_BLOCK - 1) / CL_PIXELS_PER_BLOCK; }

template <typename T>
cudaError_t launch(const void* x, const float* gamma, const float* beta, const float* bias, void* y, float* work,
                   int64_t N, int64_t C, int64_t HW, int64_t G, float eps, bool channels_last, cudaStream_t s) {
  const T* xt = static_cast<const T*>(x);
  T* yt = static_cast<T*>(y);
  float* stats = work;                // 2 * N * G
  float* scale = stats + 2 * N * G;   // N * C
  float* shift = scale + N * C;       // N * C
  float* partial = shift + N * C;     // 3 * N * chunks * G (NHWC partial statistics only)
  const auto hw = static_cast<uint32_t>(HW);
  if (!channels_last) {
    stats_nchw_kernel<T><<<static_cast<unsigned>(N * G), THREADS, 0, s>>>(xt, bias, stats, C, hw, G, eps);
  } else if (nhwc_partial_fits(N, C)) {
    const dim3 grid(static_cast<unsigned>(nhwc_chunks(HW)), static_cast<unsigned>(N));
    stats_nhwc_partial_kernel<T><<<grid, THREADS, 0, s>>>(xt, bias, partial, static_cast<uint32_t>(C), hw,
                                                          static_cast<uint32_t>(G));
    stats_merge_kernel<<<blocks_for(N * G, N * G), THREADS, 0, s>>>(partial, stats, N * G, G,
                                                                     static_cast<uint32_t>(nhwc_chunks(HW)), eps);
  } else {
    stats_nhwc_generic_kernel<T><<<static_cast<unsigned>(N * G), THREADS, 0, s>>>(xt, bias, stats, C, hw, G, eps);
  }
  fold_kernel<<<blocks_for(N * C, N * C), THREADS, 0, s>>>(stats, gamma, beta, bias, scale, shift, N * C, C, G);
  if (!channels_last) {
    const dim3 grid(blocks_for(HW, APPLY_BLOCKS_PER_PLANE), static_cast<unsigned>(N * C < MAX_GRID_Y ? N * C : MAX_GRID_Y));
    apply_nchw_kernel<T><<<grid, THREADS, 0, s>>>(xt, scale, shift, yt, N * C, hw);
  } else {
    const dim3 grid(blocks_for(HW * C, APPLY_BLOCKS_PER_SAMPLE), static_cast<unsigned>(N < MAX_GRID_Y ? N : MAX_GRID_Y));
    apply_nhwc_kernel<T><<<grid, THREADS, 0, s>>>(xt, scale, shift, yt, N, static_cast<uint32_t>(C),
                                                  static_cast<uint32_t>(HW * C));
  }
  return cudaGetLastError();
}

}  // namespace

int64_t adagn_workspace_floats(int64_t N, int64_t C, int64_t HW, int64_t groups, bool channels_last) {
  const int64_t partial = channels_last && nhwc_partial_fits(N, C) ? 3 * N * nhwc_chunks(HW) * groups : 0;
  return 2 * N * groups + 2 * N * C + partial;
}

cudaError_t adagn_silu(const void* x, const float* gamma, const float* beta, const float* bias, void* y,
                       float* workspace, int64_t N, int64_t C, int64_t HW, int64_t groups, float eps,
                       bool channels_last, DType dtype, cudaStream_t stream) {
  if (N == 0 || C == 0 || HW == 0) return cudaSuccess;  // nothing to launch (zero-size grids are errors)
  if (HW * C > kAdagnMaxPlane || groups <= 0 || C % groups != 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::Float32:
      return launch<float>(x, gamma, beta, bias, y, workspace, N, C, HW, groups, eps, channels_last, stream);
    case DType::Float16:
      return launch<__half>(x, gamma, beta, bias, y, workspace, N, C, HW, groups, eps, channels_last, stream);
    case DType::BFloat16:
      return launch<__nv_bfloat16>(x, gamma, beta, bias, y, workspace, N, C, HW, groups, eps, channels_last, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cdal_cuda
