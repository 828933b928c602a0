// Warp- and block-wide reductions shared by the CUDA kernels (torch-free, nvcc only).
//
// block_reduce combines one value per thread of a THREADS-thread block with a binary operator:
// a shuffle reduction inside each warp, the warp results through `scratch` (THREADS / 32 slots of
// shared memory), a second shuffle reduction in warp 0, and the result broadcast to every thread.
// A type reduces if an overload shfl_down(T, int) exists: float here; the Welford triple of the
// adagn_silu statistics defines its own next to the type (found by argument-dependent lookup).
#pragma once

#include <cuda_runtime.h>

namespace cdal_cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float shfl_down(float v, int offset) { return __shfl_down_sync(kFullMask, v, offset); }

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = op(v, shfl_down(v, offset));
  return v;
}

// Every thread of the block must call it; `identity` fills the lanes of warp 0 beyond the warp count.
template <int THREADS, typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T identity, T* scratch) {
  static_assert(THREADS % kWarpSize == 0 && THREADS / kWarpSize <= kWarpSize, "THREADS: whole warps, at most 32");
  v = warp_reduce(v, op);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < THREADS / kWarpSize ? scratch[lane] : identity;
    v = warp_reduce(v, op);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  const T out = scratch[0];
  __syncthreads();  // scratch may be reused by the next reduction
  return out;
}

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

}  // namespace cdal_cuda
