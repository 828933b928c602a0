// cdal-fast custom ops: shared declarations.
//
// The schemas live in one place (register.cpp). Each backend has one kernel file that registers
// its implementations with TORCH_LIBRARY_IMPL: cpu/*.cpp (always built), cuda/ops_cuda_glue.cpp
// (built only against a CUDA build of torch; the kernels themselves are torch-free .cu files).
#pragma once

#include <ATen/ATen.h>
#include <optional>

namespace cdal {

// Residual skip scale 1/sqrt(2) (NCSN++ skip_rescale), the same double as cdal_fast.ops.skip_rescale.
constexpr double kSkipScale = 0.7071067811865476;

// Shape and argument checks shared by every backend.
void check_adagn_args(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                      const std::optional<at::Tensor>& bias, int64_t groups);
void check_attention_args(const at::Tensor& x, const at::Tensor& norm_w, const at::Tensor& norm_b,
                          const at::Tensor& qkv_w, const std::optional<at::Tensor>& qkv_b,
                          const at::Tensor& proj_w, const std::optional<at::Tensor>& proj_b, int64_t groups);

// Checked, layout-resolved inputs of adagn_silu shared by the CPU and CUDA kernels: x keeps a
// channels-last layout (else is made NCHW-contiguous); gamma/beta/bias become float32 contiguous.
struct AdagnInputs {
  at::Tensor x, gamma, beta, bias;  // bias undefined when absent
  bool channels_last;
  int64_t N, C, HW;
  const float* bias_ptr() const { return bias.defined() ? bias.data_ptr<float>() : nullptr; }
};
AdagnInputs prepare_adagn(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                          const std::optional<at::Tensor>& bias, int64_t groups);

// The part of the attention block around the fused core, shared by CPU and CUDA:
// GroupNorm -> qkv projection, returned as (N, HW, 3C) token-major; and the output projection.
at::Tensor attention_qkv_tokens(const at::Tensor& x, const at::Tensor& norm_w, const at::Tensor& norm_b,
                                const at::Tensor& qkv_w, const std::optional<at::Tensor>& qkv_b,
                                int64_t groups, double eps);
at::Tensor attention_output(const at::Tensor& x, const at::Tensor& attn_tokens, const at::Tensor& proj_w,
                            const std::optional<at::Tensor>& proj_b);

}  // namespace cdal
