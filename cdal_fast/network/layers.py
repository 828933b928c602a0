"""Building blocks shared by the generator (spec section 4).

Every block is TorchScript-friendly (optional submodules are ``None`` and tested with ``is not
None``), and the two layer types that the fused ops replace, latent modulation + SiLU and the
self-attention block, each live in one module with a ``fused`` switch so the same weights run on
either path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .fir import depthwise_fir, fir_down, fir_up


# -- initialisation ---------------------------------------------------------------------------
def variance_scaling_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """fan_avg / uniform variance scaling, as in NCSN++ (``default_init``)."""
    receptive = weight[0][0].numel() if weight.dim() > 2 else 1
    fan_in = weight.shape[1] * receptive
    fan_out = weight.shape[0] * receptive
    variance = scale / ((fan_in + fan_out) / 2.0)
    bound = math.sqrt(3.0 * variance)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def conv(in_ch: int, out_ch: int, kernel: int, init_scale: float = 1.0, stride: int = 1,
         padding: int | None = None, bias: bool = True) -> nn.Conv2d:
    layer = nn.Conv2d(in_ch, out_ch, kernel, stride=stride,
                      padding=kernel // 2 if padding is None else padding, bias=bias)
    variance_scaling_(layer.weight, init_scale)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def linear(in_f: int, out_f: int, init_scale: float = 1.0) -> nn.Linear:
    layer = nn.Linear(in_f, out_f)
    variance_scaling_(layer.weight, init_scale)
    nn.init.zeros_(layer.bias)
    return layer


def gn_groups(channels: int) -> int:
    """``min(C // 4, 32)`` groups, NCSN++'s rule."""
    return max(1, min(channels // 4, 32))


# -- latent modulation ------------------------------------------------------------------------
class AdaGNSiLU(nn.Module):
    """SiLU(gamma * GroupNorm(x + bias) + beta) with (gamma, beta) = Linear(zemb).

    ``bias`` is the per-sample, per-channel step-embedding projection that precedes the second
    norm of every residual block; folding it in lets the fused op read ``h`` exactly once.
    ``fused`` is a TorchScript constant, so a scripted plain model never references the custom op.
    """

    __constants__ = ["fused"]

    def __init__(self, channels: int, zdim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.channels = channels
        self.groups = gn_groups(channels)
        self.eps = eps
        self.fused = False
        self.style = linear(zdim, 2 * channels)
        with torch.no_grad():
            self.style.bias[:channels] = 1.0
            self.style.bias[channels:] = 0.0

    def forward(self, x: torch.Tensor, zemb: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        style = self.style(zemb)
        gamma, beta = style[:, : self.channels], style[:, self.channels :]
        if self.fused:
            return ops.adagn_silu(x, gamma, beta, bias, self.groups, self.eps)
        return ops.adagn_silu_reference(x, gamma, beta, bias, self.groups, self.eps)


# -- residual block ---------------------------------------------------------------------------
class ResBlock(nn.Module):
    """BigGAN-style residual block with AdaGN, step embedding and optional FIR resampling.

    ``resample`` is 0 (none), -1 (down) or +1 (up).
    """

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, zdim: int, dropout: float = 0.0,
                 resample: int = 0) -> None:
        super().__init__()
        self.resample = resample
        self.norm0 = AdaGNSiLU(in_ch, zdim)
        self.conv0 = conv(in_ch, out_ch, 3)
        self.temb_proj = linear(temb_dim, out_ch)
        self.norm1 = AdaGNSiLU(out_ch, zdim)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = conv(out_ch, out_ch, 3, init_scale=1e-10)
        self.skip = conv(in_ch, out_ch, 1) if (in_ch != out_ch or resample != 0) else None
        # h and x both have in_ch channels where they are resampled
        self.register_buffer("fir", depthwise_fir(in_ch), persistent=False)

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor, zemb: torch.Tensor) -> torch.Tensor:
        h = self.norm0(x, zemb)
        if self.resample > 0:
            h = fir_up(h, self.fir)
            x = fir_up(x, self.fir)
        elif self.resample < 0:
            h = fir_down(h, self.fir)
            x = fir_down(x, self.fir)
        h = self.conv0(h)
        h = self.norm1(h, zemb, self.temb_proj(temb_act))
        h = self.dropout(h)
        h = self.conv1(h)
        if self.skip is not None:
            x = self.skip(x)
        return ops.skip_rescale(x, h)


# -- self-attention ---------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """GN -> q, k, v (1x1) -> softmax(q k^T / sqrt(C)) v -> 1x1 -> (x + out) / sqrt(2).

    q, k and v are one 1x1 conv with 3C outputs (same parameters as three C -> C convs, one
    read of the normalised input); each third is initialised on its own.
    """

    __constants__ = ["fused"]

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.fused = False
        self.norm = nn.GroupNorm(gn_groups(channels), channels, eps=1e-6)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        with torch.no_grad():
            for i in range(3):
                variance_scaling_(self.qkv.weight[i * channels:(i + 1) * channels], 0.1)
            self.qkv.bias.zero_()
        self.proj = conv(channels, channels, 1, init_scale=1e-10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return ops.self_attention(
                x, self.norm.weight, self.norm.bias, self.qkv.weight, self.qkv.bias,
                self.proj.weight, self.proj.bias, self.norm.num_groups, self.norm.eps)
        return ops.self_attention_reference(
            x, self.norm.weight, self.norm.bias, self.qkv.weight, self.qkv.bias,
            self.proj.weight, self.proj.bias, self.norm.num_groups, self.norm.eps)


# -- condition encoder ------------------------------------------------------------------------
class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class CondBlock(nn.Module):
    """Plain residual block of the condition encoder: no step, no latent input."""

    def __init__(self, channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        groups = min(32, channels)
        self.norm0 = GroupNorm32(groups, channels)
        self.conv0 = conv(channels, channels, 3)
        self.norm1 = GroupNorm32(groups, channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = conv(channels, channels, 3)
        with torch.no_grad():
            self.conv1.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        return x + h


class PixelNorm(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z / torch.sqrt(torch.mean(z * z, dim=1, keepdim=True) + 1e-8)


def timestep_embedding(k: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer steps: first half sin, second half cos."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=k.device)
                     * (-math.log(10000.0) / (half - 1)))
    arg = k.to(torch.float32)[:, None] * freq[None, :]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
