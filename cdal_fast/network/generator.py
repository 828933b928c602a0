"""cDAL generator: NCSN++-style U-Net with latent embedding (spec section 4).

The condition encoder is exposed on its own (:meth:`Generator.encode`) because it depends on the
image only: the sampler runs it once per tile and reuses ``c`` for all T steps and V votes.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import ModelConfig
from .fir import depthwise_fir, fir_blur_pad2
from .layers import (
    AdaGNSiLU,
    CondBlock,
    PixelNorm,
    ResBlock,
    SelfAttention,
    conv,
    gn_groups,
    linear,
    timestep_embedding,
)

__all__ = ["Generator", "HEAD_MAPS"]

# maps per mask channel the head predicts: x0 (diffusion), or probability and uncertainty (one-pass)
HEAD_MAPS = {False: 1, True: 2}


class DownUnit(nn.Module):
    """One residual block of the down path, followed by attention where configured."""

    def __init__(self, block: ResBlock, attn: SelfAttention | None) -> None:
        super().__init__()
        self.block = block
        self.attn = attn

    def forward(self, h: torch.Tensor, temb: torch.Tensor, zemb: torch.Tensor) -> torch.Tensor:
        h = self.block(h, temb, zemb)
        if self.attn is not None:
            h = self.attn(h)
        return h


class PyramidDown(nn.Module):
    """StyleGAN2 filtered downsampling conv of the input pyramid (FIR pad 2, 3x3 stride 2)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = conv(in_ch, out_ch, 3, stride=2, padding=0)
        self.register_buffer("fir", depthwise_fir(in_ch), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(fir_blur_pad2(x, self.fir))


class DownLevel(nn.Module):
    def __init__(self, units: list[DownUnit], down: ResBlock | None, pyramid: PyramidDown | None) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        self.down = down
        self.pyramid = pyramid

    def forward(self, h: torch.Tensor, pyr: torch.Tensor, temb: torch.Tensor, zemb: torch.Tensor,
                hs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        for unit in self.units:
            h = unit(h, temb, zemb)
            hs.append(h)
        if self.down is not None and self.pyramid is not None:
            h = self.down(h, temb, zemb)
            pyr = self.pyramid(pyr)
            h = ops.skip_rescale(pyr, h)
            pyr = h
            hs.append(h)
        return h, pyr


class UpLevel(nn.Module):
    def __init__(self, blocks: list[ResBlock], attn: SelfAttention | None, up: ResBlock | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = attn
        self.up = up

    def forward(self, h: torch.Tensor, temb: torch.Tensor, zemb: torch.Tensor,
                hs: list[torch.Tensor]) -> torch.Tensor:
        for block in self.blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), temb, zemb)
        if self.attn is not None:
            h = self.attn(h)
        if self.up is not None:
            h = self.up(h, temb, zemb)
        return h


class Generator(nn.Module):
    """x0_hat = G(x_{k+1}, k, image, z)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        nf, temb_dim, zdim, p = cfg.nf, 4 * cfg.nf, cfg.zdim, cfg.dropout
        self.nf = nf
        self.nz = cfg.nz

        mapping: list[nn.Module] = [PixelNorm(), linear(cfg.nz, zdim), nn.SiLU()]
        for _ in range(cfg.n_mlp):
            mapping += [linear(zdim, zdim), nn.SiLU()]
        self.mapping = nn.Sequential(*mapping)
        self.temb0 = linear(nf, temb_dim)
        self.temb1 = linear(temb_dim, temb_dim)

        self.cond_in = conv(cfg.img_channels, nf, 3)
        self.cond_blocks = nn.Sequential(
            *[CondBlock(nf, p) for _ in range(cfg.cond_enc_layers * cfg.cond_enc_num_res_blocks)]
        )

        self.conv_in = conv(cfg.mask_channels, nf, 3)
        n_levels = len(cfg.ch_mult)
        res = [cfg.image_size // 2**i for i in range(n_levels)]
        hs_c = [nf]
        in_ch = nf
        pyr_ch = cfg.mask_channels
        down_levels = []
        for i in range(n_levels):
            out_ch = nf * cfg.ch_mult[i]
            units = []
            for _ in range(cfg.num_res_blocks):
                attn = SelfAttention(out_ch) if res[i] in cfg.attn_resolutions else None
                units.append(DownUnit(ResBlock(in_ch, out_ch, temb_dim, zdim, p), attn))
                in_ch = out_ch
                hs_c.append(in_ch)
            down = pyramid = None
            if i != n_levels - 1:
                down = ResBlock(in_ch, in_ch, temb_dim, zdim, p, resample=-1)
                pyramid = PyramidDown(pyr_ch, in_ch)
                pyr_ch = in_ch
                hs_c.append(in_ch)
            down_levels.append(DownLevel(units, down, pyramid))
        self.down_levels = nn.ModuleList(down_levels)

        self.mid0 = ResBlock(in_ch, in_ch, temb_dim, zdim, p)
        self.mid_attn = SelfAttention(in_ch)
        self.mid1 = ResBlock(in_ch, in_ch, temb_dim, zdim, p)

        up_levels = []
        for i in reversed(range(n_levels)):
            out_ch = nf * cfg.ch_mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(in_ch + hs_c.pop(), out_ch, temb_dim, zdim, p))
                in_ch = out_ch
            attn = SelfAttention(in_ch) if res[i] in cfg.attn_resolutions else None
            up = ResBlock(in_ch, in_ch, temb_dim, zdim, p, resample=1) if i != 0 else None
            up_levels.append(UpLevel(blocks, attn, up))
        self.up_levels = nn.ModuleList(up_levels)
        assert not hs_c, "every skip must be consumed exactly once"

        self.head_norm = nn.GroupNorm(gn_groups(in_ch), in_ch, eps=1e-6)
        self.head_conv = conv(in_ch, cfg.mask_channels * HEAD_MAPS[cfg.one_pass], 3, init_scale=1e-10)

    # -- public API ----------------------------------------------------------------------------
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Condition encoder: image (B, C_img, H, W) -> c (B, nf, H, W)."""
        return self.cond_blocks(self.cond_in(image))

    def step_embedding(self, k: torch.Tensor) -> torch.Tensor:
        """SiLU(temb(k)), the form every residual block consumes."""
        temb = timestep_embedding(k, self.nf).to(self.temb0.weight.dtype)
        temb = self.temb1(F.silu(self.temb0(temb)))
        return F.silu(temb)

    def denoise(self, x: torch.Tensor, k: torch.Tensor, c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Predict x0 from the noisy mask x = x_{k+1}, step k, condition c and latent z."""
        zemb = self.mapping(z)
        temb = self.step_embedding(k).to(x.dtype)
        zemb = zemb.to(x.dtype)
        h = self.conv_in(x) + c
        pyr = x
        hs: list[torch.Tensor] = [h]
        for level in self.down_levels:
            h, pyr = level(h, pyr, temb, zemb, hs)
        h = self.mid0(h, temb, zemb)
        h = self.mid_attn(h)
        h = self.mid1(h, temb, zemb)
        for level in self.up_levels:
            h = level(h, temb, zemb, hs)
        h = F.silu(self.head_norm(h))
        return torch.tanh(self.head_conv(h))

    def forward(self, x: torch.Tensor, k: torch.Tensor, image: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.denoise(x, k, self.encode(image), z)

    # -- fused-op switch ---------------------------------------------------------------------------
    def set_fused(self, fused: bool) -> Generator:
        """Route latent modulation and self-attention through the ``cdal`` custom ops.

        Without the compiled op library this keeps the plain path (the loader warns once).
        """
        if fused and not ops.extension_available():
            fused = False
        for m in self.modules():
            if isinstance(m, (AdaGNSiLU, SelfAttention)):
                m.fused = fused
        return self

    def with_fused(self, fused: bool) -> Generator:
        """A copy routed through the custom ops or not, sharing this generator's parameters and buffers.

        Builders use it so that choosing fusion for one sampler never changes the caller's model
        (a later ``set_fused`` on either copy leaves the other as it was). Only the module objects
        are copied; the tensors are the same, so it costs no parameter memory.
        """
        shared = {id(t): t for t in (*self.parameters(), *self.buffers())}
        return copy.deepcopy(self, memo=shared).set_fused(fused)
