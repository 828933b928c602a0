// Torch-free launcher API of the CUDA kernels (raw pointers, sizes, a stream), so that the .cu
// files compile with nvcc alone (CI has nvcc but a CPU build of torch).
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace cdal_cuda {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// y = SiLU(gamma * GroupNorm(x + bias) + beta); gamma/beta/bias are (N, C) float32, bias may be null.
// workspace holds adagn_workspace_floats(...) floats (statistics, per-channel scale/shift, partial
// statistics). Layout: NCHW contiguous, or NHWC if channels_last. Empty inputs launch nothing;
// HW * C above kAdagnMaxPlane returns cudaErrorInvalidValue: the kernels index inside one sample with
// 32 unsigned bits, and a grid-stride loop adds its stride (at most 2^18) to an index below the bound
// before it compares, so the bound is 2^31 - 1, not 2^32 - 1: index + stride never wraps.
constexpr int64_t kAdagnMaxPlane = 0x7fffffffLL;
int64_t adagn_workspace_floats(int64_t N, int64_t C, int64_t HW, int64_t groups, bool channels_last);
cudaError_t adagn_silu(const void* x, const float* gamma, const float* beta, const float* bias, void* y,
                       float* workspace, int64_t N, int64_t C, int64_t HW, int64_t groups, float eps,
                       bool channels_last, DType dtype, cudaStream_t stream);

// Fused attention core: qkv (N, HW, 3C) float32 token-major -> out (N, HW, C) float32,
// softmax(q k^T / sqrt(C)) v with the scores kept in shared memory: one block holds the scaled
// query (C floats), the scores of all HW keys and the reduction scratch (32 floats), which must fit
// in the default 48 KiB of dynamic shared memory (about 12k tokens at C = 256). Callers check
// attention_smem_bytes(HW, C) <= kAttentionSmemLimit; beyond it the launcher returns
// cudaErrorInvalidValue.
constexpr size_t kAttentionSmemLimit = 48 * 1024;
constexpr int64_t kAttentionScratchFloats = 32;
inline size_t attention_smem_bytes(int64_t HW, int64_t C) {
  return static_cast<size_t>(C + HW + kAttentionScratchFloats) * sizeof(float);
}
cudaError_t attention_core(const float* qkv, float* out, int64_t N, int64_t HW, int64_t C, cudaStream_t stream);

}  // namespace cdal_cuda
