"""The two cDAL training losses (spec section 6) as functions of networks, schedule, batch and RNG.

No optimiser, scheduler, EMA or all-reduce lives here: the training loop
(:class:`cdal_fast.training.loop.Trainer`) zeroes gradients, calls a loss, back-propagates the returned
total and steps. Keeping the maths apart lets it be tested directly on the ``tiny`` preset.

Random draws come from one ``torch.Generator`` in a fixed order (documented per function), so a
resumed run that restores the generator state reproduces the same losses bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..network.diffusion import Schedule
from ..network.discriminator import Discriminator
from ..network.generator import Generator

__all__ = ["LossDraws", "DLoss", "GLoss", "r1_due", "r1_penalty", "attention_map", "d_loss", "g_loss"]

Autocast = Callable[[], AbstractContextManager]


@dataclass
class LossDraws:
    """Draws random numbers on one generator and device (the order of calls is part of the contract)."""

    gen: torch.Generator
    device: torch.device
    num_steps: int
    nz: int

    def randn(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, device=self.device)

    def steps(self, b: int) -> torch.Tensor:
        return torch.randint(0, self.num_steps, (b,), generator=self.gen, device=self.device)


@dataclass
class DLoss:
    total: torch.Tensor  # err_real + r1 + err_fake: what the loop back-propagates
    err_real: torch.Tensor
    err_fake: torch.Tensor
    r1: torch.Tensor


@dataclass
class GLoss:
    total: torch.Tensor  # mean squared error of x0_hat against the clean mask x0
    attn: torch.Tensor  # (B, 1, H, W): the attention map that weighted the mask


def r1_due(step: int, r1_gamma: float, lazy_reg: int | None) -> bool:
    """Lazy regularisation: R1 on every ``lazy_reg``-th step (0, lazy_reg, ...), or every step if unset."""
    return r1_gamma > 0 and (not lazy_reg or step % lazy_reg == 0)


def r1_penalty(d_real: torch.Tensor, x_real: torch.Tensor, r1_gamma: float) -> torch.Tensor:
    """gamma / 2 * E_b ||dD(x_real)/dx_real||^2, kept in the graph (create_graph) for the double backward."""
    (grad,) = torch.autograd.grad(d_real.sum(), x_real, create_graph=True)
    return r1_gamma / 2 * grad.float().reshape(x_real.shape[0], -1).pow(2).sum(1).mean()


def attention_map(D: Discriminator, xk: torch.Tensor, k: torch.Tensor, xk1: torch.Tensor, attn_scale: int,
                  size: tuple[int, int], autocast: Autocast = nullcontext) -> torch.Tensor:
    """Channel-mean of D's feature map number ``attn_scale``, bilinearly resized to the mask ``size``."""
    with autocast():
        feat = D.features(xk, k, xk1)[attn_scale].float()
    return F.interpolate(feat.mean(1, keepdim=True), size=size, mode="bilinear", align_corners=False)


def d_loss(G: Generator, D: Discriminator, sched: Schedule, y: torch.Tensor, x0: torch.Tensor, draws: LossDraws,
           r1_gamma: float, apply_r1: bool, autocast: Autocast = nullcontext) -> DLoss:
    """Non-saturating D loss on a real pair and a fake pair at the same k, plus R1 when ``apply_r1``.

    Draw order: k, the two pair noises, z, the posterior noise. The fake x_k is drawn from
    q(x_k | x_{k+1}, G(x_{k+1})) with the real pair's x_{k+1} and k, so D compares like with like.
    """
    b = x0.shape[0]
    k = draws.steps(b)
    xk, xk1 = sched.pair_from_noise(x0, k, draws.randn(x0.shape), draws.randn(x0.shape))
    xk.requires_grad_(apply_r1)
    with autocast():
        d_real = D(xk, k, xk1).float()
    err_real = F.softplus(-d_real).mean()
    r1 = r1_penalty(d_real, xk, r1_gamma) if apply_r1 else torch.zeros((), device=x0.device)
    z = draws.randn((b, draws.nz))
    with torch.no_grad(), autocast():
        x0_hat = G(xk1, k, y, z).float()
    x_pos = sched.posterior_draw(x0_hat, xk1, k, draws.randn(x0.shape))
    with autocast():
        d_fake = D(x_pos, k, xk1).float()
    err_fake = F.softplus(d_fake).mean()
    return DLoss(err_real + r1 + err_fake, err_real, err_fake, r1)


def g_loss(G: Generator, D: Discriminator | None, sched: Schedule, y: torch.Tensor, x0: torch.Tensor,
           draws: LossDraws, attn_scale: int, autocast: Autocast = nullcontext) -> GLoss:
    """Reconstruction loss of G on the attention-weighted mask; the target is the clean mask x0.

    Draw order: k, the two noises of the pair D's attention reads, the two noises of the pair built
    from ``attn * x0``, z. Only x_{k+1} of the attention-weighted pair is used.

    ``D=None`` is the generator-only fine-tune (``TrainConfig.attention = "none"``): the attention
    is 1 everywhere, so G learns to reconstruct the plain mask; the draw order is the same minus the
    pair D would have read. Why it exists: the discriminator is ~4x the generator's FLOPs, so on a
    CPU a generator-only step is several times cheaper.
    """
    b = x0.shape[0]
    k = draws.steps(b)
    if D is None:
        attn = torch.ones_like(x0[:, :1])
    else:
        xk, xk1 = sched.pair_from_noise(x0, k, draws.randn(x0.shape), draws.randn(x0.shape))
        attn = attention_map(D, xk, k, xk1, attn_scale, x0.shape[-2:], autocast)
    _, xk1_att = sched.pair_from_noise(attn * x0, k, draws.randn(x0.shape), draws.randn(x0.shape))
    z = draws.randn((b, draws.nz))
    with autocast():
        x0_hat = G(xk1_att, k, y, z).float()
    return GLoss((x0 - x0_hat).pow(2).reshape(b, -1).mean(1).mean(), attn)
