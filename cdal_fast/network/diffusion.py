"""Variance-preserving T-step schedule, training pairs and posterior draws (spec section 2).

All coefficient tables are computed once in float64 and stored as float32, as the reference
does, so that ``a_cum`` etc. match it to the last bit that float32 holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Schedule", "make_schedule"]

EPS_T = 1e-3


def _var_vp(t: torch.Tensor, beta_min: float, beta_max: float) -> torch.Tensor:
    return 1.0 - torch.exp(-0.5 * t**2 * (beta_max - beta_min) - t * beta_min)


@dataclass(frozen=True)
class Schedule:
    """Coefficient tables of one schedule; index k as in the spec."""

    num_steps: int
    a: torch.Tensor  # (T+1,) sqrt(1 - beta_k)
    s: torch.Tensor  # (T+1,) sqrt(beta_k)
    a_cum: torch.Tensor  # (T+1,)
    s_cum: torch.Tensor  # (T+1,)
    betas: torch.Tensor  # (T+1,) with beta_0 = 1e-8
    post_c1: torch.Tensor  # (T,)
    post_c2: torch.Tensor  # (T,)
    post_logvar: torch.Tensor  # (T,)

    def to(self, device: torch.device | str) -> Schedule:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Schedule(**moved)

    # -- forward chain -------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_k = a_cum[k] x0 + s_cum[k] n."""
        return _bcast(self.a_cum, k, x0) * x0 + _bcast(self.s_cum, k, x0) * noise

    def pair(
        self, x0: torch.Tensor, k: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pair (x_k, x_{k+1}) for integer steps k in [0, T-1]."""
        n1 = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        n2 = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self.pair_from_noise(x0, k, n1, n2)

    def pair_from_noise(
        self, x0: torch.Tensor, k: torch.Tensor, n1: torch.Tensor, n2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        xk = self.q_sample(x0, k, n1)
        xk1 = _bcast(self.a, k + 1, x0) * xk + _bcast(self.s, k + 1, x0) * n2
        return xk, xk1

    # -- reverse step ----------------------------------------------------------------------
    def posterior_draw(
        self, x0_hat: torch.Tensor, x_next: torch.Tensor, k: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """x_k ~ q(x_k | x_{k+1}, x0_hat); no noise is added at k = 0."""
        mean = _bcast(self.post_c1, k, x0_hat) * x0_hat + _bcast(self.post_c2, k, x0_hat) * x_next
        std = torch.exp(0.5 * _bcast(self.post_logvar, k, x0_hat))
        nonzero = (k > 0).to(x0_hat.dtype).view(-1, *([1] * (x0_hat.dim() - 1)))
        return mean + nonzero * std * noise


def _bcast(table: torch.Tensor, k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return table.to(like.device)[k].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def make_schedule(num_steps: int, beta_min: float = 0.1, beta_max: float = 20.0) -> Schedule:
    """Build the tables of spec section 2 for T = ``num_steps``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps * (1.0 - EPS_T) + EPS_T
    abar = 1.0 - _var_vp(t, beta_min, beta_max)
    betas = torch.cat([torch.tensor([1e-8], dtype=torch.float64), 1.0 - abar[1:] / abar[:-1]])
    betas = betas.to(torch.float32)
    a = torch.sqrt(1.0 - betas)
    s = torch.sqrt(betas)
    a_cum = torch.cumprod(a, 0)
    s_cum = torch.sqrt(1.0 - a_cum**2)

    pb = betas[1:]
    alpha = 1.0 - pb
    abar_p = torch.cumprod(alpha, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float32), abar_p[:-1]])
    post_var = pb * (1.0 - abar_prev) / (1.0 - abar_p)
    c1 = pb * torch.sqrt(abar_prev) / (1.0 - abar_p)
    c2 = (1.0 - abar_prev) * torch.sqrt(alpha) / (1.0 - abar_p)
    logvar = torch.log(torch.clamp(post_var, min=1e-20))
    return Schedule(num_steps, a, s, a_cum, s_cum, betas, c1, c2, logvar)

