// ATen glue registering the CUDA kernels (compiled only against a CUDA build of torch).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops.h"
#include "kernels.h"

namespace cdal {
namespace {

cdal_cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cdal_cuda::DType::Float32;
    case at::kHalf: return cdal_cuda::DType::Float16;
    case at::kBFloat16: return cdal_cuda::DType::BFloat16;
    default: TORCH_CHECK(false, "cdal ops on CUDA support float32, float16 and bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

at::Tensor adagn_silu_cuda(const at::Tensor& x_in, const at::Tensor& gamma, const at::Tensor& beta,
                           const std::optional<at::Tensor>& bias, int64_t groups, double eps) {
  c10::cuda::CUDAGuard guard(x_in.device());
  const AdagnInputs in = prepare_adagn(x_in, gamma, beta, bias, groups);  // devices and dtypes checked
  at::Tensor y = at::empty_like(in.x);
  if (y.numel() == 0) return y;  // as on the CPU: nothing to compute, and a zero-size grid is a launch error
  TORCH_CHECK(in.C * in.HW <= cdal_cuda::kAdagnMaxPlane, "cdal::adagn_silu on CUDA indexes one sample with 32 bits: ",
              "C x H x W = ", in.C, " x ", x_in.size(2), " x ", x_in.size(3), " is over ", cdal_cuda::kAdagnMaxPlane);
  at::Tensor work = at::empty({cdal_cuda::adagn_workspace_floats(in.N, in.C, in.HW, groups, in.channels_last)},
                              in.x.options().dtype(at::kFloat));
  check_cuda(cdal_cuda::adagn_silu(in.x.data_ptr(), in.gamma.data_ptr<float>(), in.beta.data_ptr<float>(),
                                   in.bias_ptr(), y.data_ptr(), work.data_ptr<float>(), in.N, in.C, in.HW, groups,
                                   static_cast<float>(eps), in.channels_last, dtype_of(in.x),
                                   at::cuda::getCurrentCUDAStream()),
             "cdal::adagn_silu CUDA kernel");
  return y;
}

at::Tensor self_attention_cuda(const at::Tensor& x, const at::Tensor& norm_w, const at::Tensor& norm_b,
                               const at::Tensor& qkv_w, const std::optional<at::Tensor>& qkv_b,
                               const at::Tensor& proj_w, const std::optional<at::Tensor>& proj_b, int64_t groups,
                               double eps) {
  check_attention_args(x, norm_w, norm_b, qkv_w, qkv_b, proj_w, proj_b, groups);
  dtype_of(x);
  c10::cuda::CUDAGuard guard(x.device());
  if (x.numel() == 0) return at::empty_like(x);  // no tokens: no launch (a zero-size grid is an error)
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const size_t smem = cdal_cuda::attention_smem_bytes(HW, C);
  TORCH_CHECK(smem <= cdal_cuda::kAttentionSmemLimit, "cdal::self_attention on CUDA keeps the scores of all keys in "
              "shared memory: sequence length HW = ", HW, " (", x.size(2), "x", x.size(3), ") at C = ", C, " needs ",
              smem, " bytes, over the limit of ", cdal_cuda::kAttentionSmemLimit, " bytes; run this layer unfused "
              "(Generator.set_fused(False)) for inputs this large");
  const at::Tensor qkv = attention_qkv_tokens(x, norm_w, norm_b, qkv_w, qkv_b, groups, eps).to(at::kFloat).contiguous();
  at::Tensor attn = at::empty({N, HW, C}, qkv.options());
  check_cuda(cdal_cuda::attention_core(qkv.data_ptr<float>(), attn.data_ptr<float>(), N, HW, C,
                                       at::cuda::getCurrentCUDAStream()),
             "cdal::self_attention CUDA kernel");
  return attention_output(x, attn.to(x.scalar_type()), proj_w, proj_b);
}

}  // namespace
}  // namespace cdal

TORCH_LIBRARY_IMPL(cdal, CUDA, m) {
  m.impl("adagn_silu", &cdal::adagn_silu_cuda);
  m.impl("self_attention", &cdal::self_attention_cuda);
}
