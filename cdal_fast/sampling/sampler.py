"""Fixed-step cDAL sampler (spec section 3) with all votes of a batch in one pass per step.

The sampler module takes its noise as explicit tensors, so that

* results are reproducible without touching the global RNG (the noise is drawn by
  :func:`draw_noise` from ``torch.Generator`` objects, one per image if wanted);
* the same module scripts with TorchScript and exports to ONNX / AOTInductor unchanged;
* a slide tiler can derive each tile's noise from the seed and the tile's position.

Layout: votes are stacked vote-major, i.e. row ``v * B + b`` is vote ``v`` of image ``b``.

Test-time augmentation (``tta=True``): vote ``v`` runs in the frame of dihedral transform ``d_v``
(:mod:`cdal_fast.sampling.dihedral`): its condition image *and its noise* are transformed, its sample is
mapped back by the inverse before the votes are averaged. The noise is still drawn in the tile's own
frame (keyed by position, vote and step as without TTA), so results stay position-keyed and
batch-size invariant, and a generator that is itself equivariant gives exactly the plain result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..network.diffusion import make_schedule
from ..network.generator import Generator
from .decode import MaskChannels, MaskKind, to_labels
from .dihedral import apply_dihedral, invert_dihedral, vote_codes
from .preprocess import object_sign

__all__ = ["SamplerLike", "SAMPLER_ATTRS", "copy_sampler_attrs", "FixedStepSampler", "SamplerNoise", "draw_noise",
           "draw_image_noise", "stack_noise", "decode_mask", "sample", "generators_from_seed", "position_generator"]


@runtime_checkable
class SamplerLike(Protocol):
    """What a caller of a T-step, V-vote sampler relies on (eager, scripted, compiled, ONNX, TensorRT, graphs).

    The attributes size the noise (:func:`draw_noise`); the call maps a normalised image batch and
    its noise to the vote-mean probability and the vote std, each (B, C_mask, H, W).
    """

    num_steps: int
    votes: int
    mask_channels: int
    nz: int

    def __call__(self, image: torch.Tensor, x_init: torch.Tensor, z: torch.Tensor,
                 post_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


SAMPLER_ATTRS = ("num_steps", "votes", "mask_channels", "nz")


def copy_sampler_attrs(dst: object, src: SamplerLike) -> None:
    """Give a wrapper the :class:`SamplerLike` attributes of the sampler it runs."""
    for name in SAMPLER_ATTRS:
        setattr(dst, name, int(getattr(src, name)))


@dataclass
class SamplerNoise:
    """Every random number one sampler call consumes."""

    x_init: torch.Tensor  # (V*B, C_mask, H, W)
    z: torch.Tensor  # (T, V*B, nz)
    post: torch.Tensor  # (T, V*B, C_mask, H, W); the last step (k = 0) adds none

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> SamplerNoise:
        return SamplerNoise(*(t.to(device=device, dtype=dtype, non_blocking=non_blocking)
                              for t in (self.x_init, self.z, self.post)))

    def pin_memory(self) -> SamplerNoise:
        """Page-locked copies: the DataLoader's pin thread calls this (it pins any batch element with a
        ``pin_memory`` method), so the noise, most of a batch's bytes, copies to the GPU asynchronously."""
        return SamplerNoise(self.x_init.pin_memory(), self.z.pin_memory(), self.post.pin_memory())


class FixedStepSampler(nn.Module):
    """T reverse steps x V votes; returns the vote-mean probability and the vote std.

    ``tta`` turns on test-time augmentation (module docstring): same number of denoising forwards,
    the condition encoder runs once per vote instead of once per image.
    """

    def __init__(self, generator: Generator, num_steps: int | None = None, votes: int | None = None,
                 tta: bool = False) -> None:
        super().__init__()
        self.tta = bool(tta)
        cfg = generator.cfg
        self.generator = generator
        self.num_steps = int(num_steps if num_steps is not None else cfg.num_steps)
        self.votes = int(votes if votes is not None else cfg.votes)
        self.mask_channels = cfg.mask_channels
        self.nz = cfg.nz
        self.object_sign = object_sign(cfg)  # -1 for models whose object is the -1 side
        sched = make_schedule(self.num_steps, cfg.beta_min, cfg.beta_max)
        self.register_buffer("c1", sched.post_c1.clone(), persistent=False)
        self.register_buffer("c2", sched.post_c2.clone(), persistent=False)
        self.register_buffer("post_std", torch.exp(0.5 * sched.post_logvar), persistent=False)

    def forward(self, image: torch.Tensor, x_init: torch.Tensor, z: torch.Tensor,
                post_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, C_img, H, W), already normalised -> (prob, std), each (B, C_mask, H, W)."""
        b = image.shape[0]
        v = self.votes
        codes = vote_codes(v, image.shape[-2] == image.shape[-1]) if self.tta else [0]
        if self.tta:
            c = self.generator.encode(torch.cat([apply_dihedral(image, d) for d in codes], 0))
        else:
            c = self.generator.encode(image).repeat(v, 1, 1, 1)
        x = _to_vote_frames(x_init.to(c.dtype), codes, b, False)
        for i in range(self.num_steps):
            step = self.num_steps - 1 - i
            k = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
            x0 = self.generator.denoise(x, k, c, z[i].to(c.dtype))
            x = self.c1[step].to(x.dtype) * x0 + self.c2[step].to(x.dtype) * x
            if step > 0:
                x = x + self.post_std[step].to(x.dtype) * _to_vote_frames(post_noise[i].to(x.dtype), codes, b, False)
        x = _to_vote_frames(x, codes, b, True)
        p = torch.clamp((self.object_sign * x.float() + 1.0) * 0.5, 0.0, 1.0)
        p = p.reshape(v, b, p.shape[1], p.shape[2], p.shape[3])
        return p.mean(dim=0), p.std(dim=0, unbiased=False)


def _to_vote_frames(x: torch.Tensor, codes: list[int], batch: int, inverse: bool) -> torch.Tensor:
    """Vote-major rows (V*B, ...) with vote block ``v`` under transform ``codes[v]`` (or its inverse).

    ``codes == [0]`` (no TTA) returns ``x`` itself, so the plain sampler does no extra work.
    """
    if len(codes) == 1 and codes[0] == 0:
        return x
    blocks = [x[j * batch:(j + 1) * batch] for j in range(len(codes))]
    if inverse:
        return torch.cat([invert_dihedral(blk, d) for blk, d in zip(blocks, codes)], 0)
    return torch.cat([apply_dihedral(blk, d) for blk, d in zip(blocks, codes)], 0)


def draw_image_noise(num_steps: int, votes: int, mask_channels: int, nz: int, height: int, width: int,
                     generator: torch.Generator) -> SamplerNoise:
    """All noise of one image (rows are its V votes), drawn in a fixed order from ``generator``."""
    x_init = torch.randn(votes, mask_channels, height, width, generator=generator)
    z = torch.randn(num_steps, votes, nz, generator=generator)
    post = torch.randn(num_steps, votes, mask_channels, height, width, generator=generator)
    return SamplerNoise(x_init, z, post)


def stack_noise(per_image: list[SamplerNoise]) -> SamplerNoise:
    """Interleave per-image noise into the sampler's vote-major batch layout."""
    b = len(per_image)
    v, cm, h, w = per_image[0].x_init.shape
    t, _, nz = per_image[0].z.shape
    x_init = torch.stack([n.x_init for n in per_image], 1).reshape(v * b, cm, h, w)
    z = torch.stack([n.z for n in per_image], 2).reshape(t, v * b, nz)
    post = torch.stack([n.post for n in per_image], 2).reshape(t, v * b, cm, h, w)
    return SamplerNoise(x_init, z, post)


def draw_noise(num_steps: int, votes: int, mask_channels: int, nz: int, height: int, width: int,
               generators: list[torch.Generator]) -> SamplerNoise:
    """Draw the noise of a batch, one CPU generator per image (so batching never changes it)."""
    return stack_noise([draw_image_noise(num_steps, votes, mask_channels, nz, height, width, g)
                        for g in generators])


def generators_from_seed(seed: int, count: int) -> list[torch.Generator]:
    """``count`` independent generators derived from one seed (image i gets seed + i)."""
    return [torch.Generator().manual_seed(int(seed) + i) for i in range(count)]


def position_generator(seed: int, *key: int) -> torch.Generator:
    """A CPU generator keyed by a seed and a position (e.g. tile row/column in pixels).

    Used wherever noise must not depend on processing order, batch size or worker count.
    """
    h = int(seed) & 0xFFFFFFFF
    for k in key:
        h = (h * 0x100000001B3 ^ (int(k) + 0x9E3779B9)) & 0x7FFFFFFFFFFFFFFF
    return torch.Generator().manual_seed(h)


def decode_mask(prob: torch.Tensor, cfg: MaskKind | None = None) -> torch.Tensor:
    """Labels of a batch (B, C, H, W): :func:`cdal_fast.sampling.decode.to_labels` with ``cfg`` (a model's
    config: its own threshold), or for callers without one with the mask channel count read from
    ``prob`` (binary 0/1 at P >= 0.5, else the argmax class)."""
    return to_labels(prob, cfg if cfg is not None else MaskChannels(prob.shape[1]))


@torch.no_grad()
def sample(sampler: SamplerLike, image: torch.Tensor, seed: int = 0,
           generators: list[torch.Generator] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Convenience: draw seeded noise for ``image`` and run ``sampler`` on image's device/dtype."""
    b, _, h, w = image.shape
    gens = generators if generators is not None else generators_from_seed(seed, b)
    noise = draw_noise(sampler.num_steps, sampler.votes, sampler.mask_channels, sampler.nz, h, w, gens)
    noise = noise.to(image.device, image.dtype)
    return sampler(image, noise.x_init, noise.z, noise.post)
