"""Thin Python wrappers of the ``cdal`` custom ops and their plain-PyTorch references.

The references are the ground truth for the parity tests and the path the model takes when
``fused=False`` or the op library cannot be had (:mod:`.op_library` loads it: prebuilt, compiled on
first use, or none, and says why). The fused wrappers call ``torch.ops.cdal.*``, which the C++
library registers with ``TORCH_LIBRARY``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .op_library import ExtensionStatus, extension_available, extension_status

__all__ = [
    "skip_rescale",
    "extension_available",
    "extension_status",
    "ExtensionStatus",
    "adagn_silu",
    "adagn_silu_reference",
    "self_attention",
    "self_attention_reference",
]


def skip_rescale(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(x + h) / sqrt(2): the NCSN++ residual skip, the one place its scale is written in Python.

    The scale is the nearest double to 1/sqrt(2), the same constant as ``kSkipScale`` in
    ``csrc/ops.h``, so the fused and plain paths scale identically. A function rather than a
    module constant because TorchScript cannot read a global float.
    """
    return (x + h) * 0.7071067811865476


def adagn_silu_reference(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                         bias: torch.Tensor | None, groups: int, eps: float) -> torch.Tensor:
    """SiLU(gamma * GroupNorm(x + bias) + beta), statistics in float32."""
    if bias is not None:
        x = x + bias[:, :, None, None].to(x.dtype)
    n = F.group_norm(x.float(), groups, None, None, eps).to(x.dtype)
    return F.silu(gamma[:, :, None, None].to(x.dtype) * n + beta[:, :, None, None].to(x.dtype))


def self_attention_reference(x: torch.Tensor, norm_w: torch.Tensor, norm_b: torch.Tensor,
                             qkv_w: torch.Tensor, qkv_b: torch.Tensor | None, proj_w: torch.Tensor,
                             proj_b: torch.Tensor | None, groups: int, eps: float) -> torch.Tensor:
    """The spec's attention block with the attention core as softmax(QK^T/sqrt(C))V."""
    b, c, h, w = x.shape
    hn = F.group_norm(x.float(), groups, norm_w.float(), norm_b.float(), eps).to(x.dtype)
    qkv = F.conv2d(hn, qkv_w, qkv_b).reshape(b, 3, c, h * w)
    q = qkv[:, 0].transpose(1, 2).unsqueeze(1)  # (B, 1, HW, C)
    k = qkv[:, 1].transpose(1, 2).unsqueeze(1)
    v = qkv[:, 2].transpose(1, 2).unsqueeze(1)
    a = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C) by default
    a = a.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
    out = F.conv2d(a, proj_w, proj_b)
    return skip_rescale(x, out)


def adagn_silu(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
               bias: torch.Tensor | None, groups: int, eps: float) -> torch.Tensor:
    """Fused latent modulation (``torch.ops.cdal.adagn_silu``); maths of :func:`adagn_silu_reference`.

    Callers make sure the library is loaded (:func:`extension_available`); the model only routes
    here after :meth:`cdal_fast.generator.Generator.set_fused` succeeded.
    """
    return torch.ops.cdal.adagn_silu(x, gamma, beta, bias, groups, eps)


def self_attention(x: torch.Tensor, norm_w: torch.Tensor, norm_b: torch.Tensor,
                   qkv_w: torch.Tensor, qkv_b: torch.Tensor | None, proj_w: torch.Tensor,
                   proj_b: torch.Tensor | None, groups: int, eps: float) -> torch.Tensor:
    """Fused self-attention block (``torch.ops.cdal.self_attention``); see :func:`self_attention_reference`."""
    return torch.ops.cdal.self_attention(x, norm_w, norm_b, qkv_w, qkv_b, proj_w, proj_b, groups, eps)
