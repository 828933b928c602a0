"""Time-dependent discriminator (spec section 5); used in training only.

Its intermediate feature maps, averaged over channels, are the spatial attention map that
re-weights the ground-truth mask in the generator step (spec section 6).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .fir import depthwise_fir, fir_down
from .layers import conv, linear, timestep_embedding

__all__ = ["Discriminator"]


class DownConvBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, t_emb_dim: int, downsample: bool) -> None:
        super().__init__()
        self.downsample = downsample
        self.conv0 = conv(in_ch, out_ch, 3)
        self.conv1 = conv(out_ch, out_ch, 3)
        self.temb_proj = linear(t_emb_dim, out_ch)
        self.skip = conv(in_ch, out_ch, 1, bias=False)
        self.register_buffer("fir_h", depthwise_fir(out_ch), persistent=False)
        self.register_buffer("fir_x", depthwise_fir(in_ch), persistent=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.leaky_relu(x, 0.2)) + self.temb_proj(temb)[:, :, None, None]
        h = F.leaky_relu(h, 0.2)
        if self.downsample:
            h = fir_down(h, self.fir_h)
            x = fir_down(x, self.fir_x)
        h = self.conv1(h)
        return (h + self.skip(x)) / math.sqrt(2.0)


# (out multiplier of ngf, downsample) per block after the 1x1 stem at 2*ngf
LARGE = ((4, True), (8, True), (8, True), (8, True), (8, True), (8, True))
SMALL = ((2, False), (4, True), (8, True), (8, True))


class Discriminator(nn.Module):
    """D(x_k, k, x_{k+1}) -> logit (B, 1)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        ngf, td = cfg.ngf, cfg.t_emb_dim
        self.t_emb_dim = td
        self.temb0 = linear(td, td)
        self.temb1 = linear(td, td)
        self.stem = conv(2 * cfg.mask_channels, 2 * ngf, 1)
        blocks = []
        in_ch = 2 * ngf
        for mult, down in (LARGE if cfg.disc == "large" else SMALL):
            blocks.append(DownConvBlock(in_ch, mult * ngf, td, down))
            in_ch = mult * ngf
        self.blocks = nn.ModuleList(blocks)
        self.final_conv = conv(in_ch + 1, in_ch, 3)
        self.end_linear = linear(in_ch, 1)

    def _temb(self, k: torch.Tensor) -> torch.Tensor:
        t = timestep_embedding(k, self.t_emb_dim)
        return F.leaky_relu(self.temb1(F.leaky_relu(self.temb0(t), 0.2)), 0.2)

    def _trunk(self, x_k: torch.Tensor, k: torch.Tensor, x_next: torch.Tensor) -> list[torch.Tensor]:
        temb = self._temb(k).to(x_k.dtype)
        h = self.stem(torch.cat([x_k, x_next], dim=1))
        feats = [h]
        for block in self.blocks:
            h = block(h, temb)
            feats.append(h)
        return feats

    def forward(self, x_k: torch.Tensor, k: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
        h = self._trunk(x_k, k, x_next)[-1]
        h = torch.cat([h, minibatch_stddev(h)], dim=1)
        h = F.leaky_relu(self.final_conv(h), 0.2)
        return self.end_linear(h.sum(dim=(2, 3)))

    @torch.no_grad()
    def features(self, x_k: torch.Tensor, k: torch.Tensor, x_next: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps after the stem and after every block (no gradient)."""
        return self._trunk(x_k, k, x_next)


def minibatch_stddev(h: torch.Tensor, group_size: int = 4) -> torch.Tensor:
    """StyleGAN2 minibatch standard deviation, one extra channel."""
    b, c, hh, ww = h.shape
    g = min(group_size, b)
    if b % g:
        raise ValueError(f"batch {b} must be divisible by the stddev group size {g}")
    y = h.reshape(g, b // g, c, hh, ww)
    y = torch.sqrt(y.float().var(dim=0, unbiased=False) + 1e-8)
    y = y.mean(dim=(1, 2, 3)).to(h.dtype)  # (b // g,)
    return y.view(1, b // g, 1, 1, 1).expand(g, b // g, 1, hh, ww).reshape(b, 1, hh, ww)
