"""One-pass models: a cDAL generator distilled from a diffusion ensemble, run once per tile.

A diffusion model's ``segment`` output is two maps: the vote-mean probability and the vote spread
(uncertainty), which cost T x V denoiser passes per tile. A one-pass model (``cfg.one_pass``) is the
same network trained to predict both maps at once (:mod:`cdal_fast.training.distill`): its head
gives two maps per mask channel, read as

    probability  = (sign * y_p + 1) / 2        (as a diffusion sample becomes a probability)
    uncertainty  = (y_u + 1) / 4               (in [0, 0.5]: the range of a vote standard deviation)

where ``y`` is the head's tanh output and ``sign`` the config's mask polarity. It is run with the
mask input and latent at zero and the step index of the first reverse step, so no noise enters.

:class:`OnePassSampler` keeps the sampler interface (:class:`~cdal_fast.sampling.sampler.SamplerLike`:
T = V = 1, noise accepted and ignored), so every path that runs a sampler (``segment``, ``eval``,
Ray workers, the ONNX / TorchScript exports) runs a one-pass model unchanged.
:func:`sampler_for` picks the sampler a generator needs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..network.generator import Generator
from .preprocess import object_sign
from .sampler import FixedStepSampler

__all__ = ["OnePassSampler", "sampler_for", "maps_from_head", "one_pass_head", "UNCERTAINTY_MAX"]

UNCERTAINTY_MAX = 0.5  # the largest standard deviation of votes in [0, 1]


def uncertainty_max() -> float:
    """:data:`UNCERTAINTY_MAX` where TorchScript needs it (it cannot read a global float)."""
    return 0.5


def maps_from_head(y: torch.Tensor, mask_channels: int, sign: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's output (B, 2 C, H, W) -> (probability, uncertainty), each (B, C, H, W) float32."""
    y = y.float()
    top = uncertainty_max()
    prob = torch.clamp((sign * y[:, :mask_channels] + 1.0) * 0.5, 0.0, 1.0)
    unc = torch.clamp((y[:, mask_channels:] + 1.0) * (top * 0.5), 0.0, top)
    return prob, unc


class OnePassSampler(nn.Module):
    """One forward of a one-pass generator; the :class:`SamplerLike` interface with T = V = 1."""

    def __init__(self, generator: Generator) -> None:
        super().__init__()
        cfg = generator.cfg
        if not cfg.one_pass:
            raise ValueError(f"{cfg.name} is a diffusion model: run it with FixedStepSampler")
        self.generator = generator
        self.tta = False
        self.num_steps = 1
        self.votes = 1
        self.mask_channels = cfg.mask_channels
        self.nz = cfg.nz
        self.step = cfg.num_steps - 1  # the first reverse step: the network's view of a mask from nothing
        self.object_sign = object_sign(cfg)

    def forward(self, image: torch.Tensor, x_init: torch.Tensor, z: torch.Tensor,
                post_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, C_img, H, W), already normalised -> (probability, uncertainty); the noise is ignored."""
        # the generator is called here, not through one_pass_head: TorchScript types a module passed
        # to a free function by the first one it compiled, so a second model's export would fail
        c = self.generator.encode(image)
        x, k, latent = zero_inputs(c, image, self.mask_channels, self.nz, self.step)
        y = self.generator.denoise(x, k, c, latent)
        return maps_from_head(y, self.mask_channels, self.object_sign)


def zero_inputs(c: torch.Tensor, image: torch.Tensor, mask_channels: int, nz: int,
                step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The denoiser's other inputs for a one-pass forward: a zero mask, the step index, a zero latent."""
    b = image.shape[0]
    x = torch.zeros(b, mask_channels, image.shape[-2], image.shape[-1], dtype=c.dtype, device=c.device)
    latent = torch.zeros(b, nz, dtype=c.dtype, device=c.device)
    k = torch.full((b,), step, dtype=torch.long, device=c.device)
    return x, k, latent


def one_pass_head(generator: Generator, image: torch.Tensor, mask_channels: int, nz: int,
                  step: int) -> torch.Tensor:
    """The head's output for ``image``: the network with a zero mask input and latent at ``step``
    (what training runs; :class:`OnePassSampler` runs the same)."""
    c = generator.encode(image)
    x, k, latent = zero_inputs(c, image, mask_channels, nz, step)
    return generator.denoise(x, k, c, latent)


def sampler_for(generator: Generator, steps: int | None = None, votes: int | None = None,
                tta: bool = False) -> nn.Module:
    """The sampler ``generator`` needs: one forward for a one-pass model (which has no steps, votes or
    TTA to choose: asking for them is an error), else the T-step, V-vote diffusion sampler."""
    if not generator.cfg.one_pass:
        return FixedStepSampler(generator, steps, votes, tta=tta)
    asked = [name for name, value in (("steps", steps), ("votes", votes)) if value not in (None, 1)]
    if tta:
        asked.append("tta")
    if asked:
        raise ValueError(f"{generator.cfg.name} is a one-pass model: {', '.join(asked)} cannot be chosen "
                         "(it predicts the ensemble's mean and spread in one forward)")
    return OnePassSampler(generator)
