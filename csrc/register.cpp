// Operator schemas (the single place they are defined) and shared helpers.
#include "ops.h"

#include <torch/library.h>

namespace cdal {

namespace {

// Every tensor argument must live on x's device (a kernel would otherwise read a foreign pointer)
// and be floating point (integers would be silently converted).
void check_same_device_float(const char* op, const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; move every argument to one device");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ", t.scalar_type());
}

}  // namespace

void check_adagn_args(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                      const std::optional<at::Tensor>& bias, int64_t groups) {
  constexpr const char* op = "cdal::adagn_silu";
  check_same_device_float(op, x, gamma, "gamma");
  check_same_device_float(op, x, beta, "beta");
  if (bias.has_value()) check_same_device_float(op, x, *bias, "bias");
  TORCH_CHECK(x.dim() == 4, "cdal::adagn_silu: x must be (N, C, H, W), got ", x.dim(), " dims");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "cdal::adagn_silu: x must be floating point, got ",
              x.scalar_type());
  const int64_t n = x.size(0), c = x.size(1);
  TORCH_CHECK(groups > 0 && c % groups == 0, "cdal::adagn_silu: channels (", c,
              ") must be divisible by groups (", groups, ")");
  TORCH_CHECK(gamma.dim() == 2 && gamma.size(0) == n && gamma.size(1) == c,
              "cdal::adagn_silu: gamma must be (N, C) = (", n, ", ", c, "), got ", gamma.sizes());
  TORCH_CHECK(beta.sizes() == gamma.sizes(), "cdal::adagn_silu: beta must be (N, C), got ", beta.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->sizes() == gamma.sizes(), "cdal::adagn_silu: bias must be (N, C), got ", bias->sizes());
  }
}

AdagnInputs prepare_adagn(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                          const std::optional<at::Tensor>& bias, int64_t groups) {
  check_adagn_args(x, gamma, beta, bias, groups);
  AdagnInputs in;
  in.channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  in.x = in.channels_last ? x : x.contiguous();
  in.gamma = gamma.to(at::kFloat).contiguous();
  in.beta = beta.to(at::kFloat).contiguous();
  if (bias.has_value()) in.bias = bias->to(at::kFloat).contiguous();
  in.N = x.size(0);
  in.C = x.size(1);
  in.HW = x.size(2) * x.size(3);
  return in;
}

void check_attention_args(const at::Tensor& x, const at::Tensor& norm_w, const at::Tensor& norm_b,
                          const at::Tensor& qkv_w, const std::optional<at::Tensor>& qkv_b,
                          const at::Tensor& proj_w, const std::optional<at::Tensor>& proj_b, int64_t groups) {
  constexpr const char* op = "cdal::self_attention";
  check_same_device_float(op, x, norm_w, "norm_w");
  check_same_device_float(op, x, norm_b, "norm_b");
  check_same_device_float(op, x, qkv_w, "qkv_w");
  check_same_device_float(op, x, proj_w, "proj_w");
  if (qkv_b.has_value()) check_same_device_float(op, x, *qkv_b, "qkv_b");
  if (proj_b.has_value()) check_same_device_float(op, x, *proj_b, "proj_b");
  TORCH_CHECK(x.dim() == 4, "cdal::self_attention: x must be (N, C, H, W), got ", x.dim(), " dims");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "cdal::self_attention: x must be floating point, got ",
              x.scalar_type());
  const int64_t c = x.size(1);
  TORCH_CHECK(groups > 0 && c % groups == 0, "cdal::self_attention: channels (", c,
              ") must be divisible by groups (", groups, ")");
  // sym_numel: the Meta kernel also runs on fake tensors with symbolic sizes (torch.export, opcheck)
  TORCH_CHECK(norm_w.sym_numel() == c && norm_b.sym_numel() == c, "cdal::self_attention: norm weight/bias need C values");
  TORCH_CHECK(qkv_w.size(0) == 3 * c && qkv_w.size(1) == c, "cdal::self_attention: qkv weight must be (3C, C, 1, 1)");
  TORCH_CHECK(proj_w.size(0) == c && proj_w.size(1) == c, "cdal::self_attention: proj weight must be (C, C, 1, 1)");
  if (qkv_b.has_value()) TORCH_CHECK(qkv_b->sym_numel() == 3 * c, "cdal::self_attention: qkv bias needs 3C values");
  if (proj_b.has_value()) TORCH_CHECK(proj_b->sym_numel() == c, "cdal::self_attention: proj bias needs C values");
}

at::Tensor attention_qkv_tokens(const at::Tensor& x, const at::Tensor& norm_w, const at::Tensor& norm_b,
                                const at::Tensor& qkv_w, const std::optional<at::Tensor>& qkv_b,
                                int64_t groups, double eps) {
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  // GroupNorm statistics in float32 whatever the input dtype (as the reference does).
  at::Tensor h = at::group_norm(x.to(at::kFloat), groups, norm_w.to(at::kFloat), norm_b.to(at::kFloat), eps)
                     .to(x.scalar_type());
  at::Tensor tokens = h.reshape({n, c, hw}).transpose(1, 2);  // (N, HW, C)
  at::Tensor w = qkv_w.reshape({3 * c, c}).to(x.scalar_type());
  at::Tensor out = at::matmul(tokens, w.t());                  // (N, HW, 3C)
  if (qkv_b.has_value()) out = out + qkv_b->to(x.scalar_type());
  return out.contiguous();
}

at::Tensor attention_output(const at::Tensor& x, const at::Tensor& attn_tokens, const at::Tensor& proj_w,
                            const std::optional<at::Tensor>& proj_b) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  at::Tensor wp = proj_w.reshape({c, c}).to(x.scalar_type());
  at::Tensor out = at::matmul(attn_tokens, wp.t());            // (N, HW, C)
  if (proj_b.has_value()) out = out + proj_b->to(x.scalar_type());
  out = out.transpose(1, 2).reshape({n, c, h, w});
  return ((x + out) * kSkipScale).contiguous(x.suggest_memory_format());
}

// Shape-only implementations so torch.compile / torch.export can trace the ops (fake tensors).
at::Tensor adagn_silu_meta(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                           const std::optional<at::Tensor>& bias, int64_t groups, double) {
  check_adagn_args(x, gamma, beta, bias, groups);
  return at::empty_like(x);
}

at::Tensor self_attention_meta(const at::Tensor& x, const at::Tensor& norm_w, const at::Tensor& norm_b,
                               const at::Tensor& qkv_w, const std::optional<at::Tensor>& qkv_b,
                               const at::Tensor& proj_w, const std::optional<at::Tensor>& proj_b,
                               int64_t groups, double) {
  check_attention_args(x, norm_w, norm_b, qkv_w, qkv_b, proj_w, proj_b, groups);
  return at::empty_like(x);
}

}  // namespace cdal

// Both ops are INFERENCE-ONLY: no autograd formula is registered, so no gradient flows through
// them (autograd's fallback warns when a backward reaches them). Training uses the plain PyTorch
// layers (Generator.set_fused(False), the default); the fused path is for sampling only.
TORCH_LIBRARY(cdal, m) {
  m.def("adagn_silu(Tensor x, Tensor gamma, Tensor beta, Tensor? bias, int groups, float eps) -> Tensor");
  m.def(
      "self_attention(Tensor x, Tensor norm_w, Tensor norm_b, Tensor qkv_w, Tensor? qkv_b, Tensor proj_w, "
      "Tensor? proj_b, int groups, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(cdal, Meta, m) {
  m.impl("adagn_silu", &cdal::adagn_silu_meta);
  m.impl("self_attention", &cdal::self_attention_meta);
}
