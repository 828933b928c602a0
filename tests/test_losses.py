"""The training losses, tested directly (tiny preset; stub networks for hand-computed values)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cdal_fast.network.config import get_preset
from cdal_fast.network.diffusion import make_schedule
from cdal_fast.training.losses import LossDraws, attention_map, d_loss, g_loss, r1_due, r1_penalty

CFG = get_preset("tiny")
B, H = 2, 8


class RecordingD(nn.Module):
    """A stand-in discriminator: records every call's k and x_next; features are constant maps 10 * (i + 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, k: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
        self.calls.append((k.clone(), x_next.detach().clone()))
        return self.w * x.reshape(x.shape[0], -1).sum(1)

    def features(self, x: torch.Tensor, k: torch.Tensor, x_next: torch.Tensor) -> list[torch.Tensor]:
        # feature i: 2 channels of 10 * (i + 1) and 30 * (i + 1) at a coarser 4x4 grid -> channel mean 20 * (i + 1)
        return [torch.cat([torch.full((x.shape[0], 1, 4, 4), 10.0 * (i + 1)),
                           torch.full((x.shape[0], 1, 4, 4), 30.0 * (i + 1))], 1) for i in range(4)]


class ConstantG(nn.Module):
    """A stand-in generator that predicts x0 = 0 everywhere and records its input."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, k: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return torch.zeros_like(x)


def _draws(seed: int = 0) -> LossDraws:
    return LossDraws(torch.Generator().manual_seed(seed), torch.device("cpu"), CFG.num_steps, CFG.nz)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randn(B, CFG.img_channels, H, H, generator=torch.Generator().manual_seed(1))
    x0 = torch.where(torch.rand(B, 1, H, H, generator=torch.Generator().manual_seed(2)) > 0.5, 1.0, -1.0)
    return y, x0


def test_r1_penalty_matches_hand_computed_value():
    # D(x) = sum(x^2) per sample -> grad 2x; x = 1 at 3 pixels of sample 0, 2 at 1 pixel of sample 1:
    # ||grad||^2 = 3 * 4 = 12 and 16; mean 14; gamma / 2 = 0.5 -> 7
    x = torch.zeros(2, 1, 2, 2)
    x[0, 0, 0, :] = 1.0
    x[0, 0, 1, 0] = 1.0
    x[1, 0, 1, 1] = 2.0
    x.requires_grad_(True)
    d_real = x.pow(2).reshape(2, -1).sum(1)
    assert r1_penalty(d_real, x, r1_gamma=1.0).item() == pytest.approx(7.0)
    assert r1_penalty(x.pow(2).reshape(2, -1).sum(1), x, r1_gamma=0.2).item() == pytest.approx(1.4)


def test_r1_only_every_lazy_reg_steps():
    assert [s for s in range(25) if r1_due(s, 1.0, 10)] == [0, 10, 20]
    assert all(r1_due(s, 1.0, None) for s in range(5))  # no lazy regularisation: every step
    assert not any(r1_due(s, 0.0, 10) for s in range(25))  # gamma 0: never


def test_d_loss_r1_term_and_fake_pair_at_the_same_k():
    sched = make_schedule(CFG.num_steps, CFG.beta_min, CFG.beta_max)
    y, x0 = _batch()
    D, G = RecordingD(), ConstantG()
    with_r1 = d_loss(G, D, sched, y, x0, _draws(), r1_gamma=2.0, apply_r1=True)
    (k_real, next_real), (k_fake, next_fake) = D.calls
    assert torch.equal(k_real, k_fake) and torch.equal(next_real, next_fake)  # fake pair: same k, same x_{k+1}
    assert torch.equal(G.seen[0], next_real)  # G denoises the real pair's x_{k+1}
    # D is linear with weight 1: grad 1 on each of the H*H pixels -> R1 = gamma / 2 * H * H
    assert with_r1.r1.item() == pytest.approx(2.0 / 2 * H * H)
    without = d_loss(G, RecordingD(), sched, y, x0, _draws(), r1_gamma=2.0, apply_r1=False)
    assert without.r1.item() == 0.0
    assert without.err_real.item() == pytest.approx(with_r1.err_real.item())  # same draws, same real term
    assert with_r1.total.item() == pytest.approx((with_r1.err_real + with_r1.r1 + with_r1.err_fake).item())


def test_attention_map_reads_feature_attn_scale_resized_to_the_mask():
    D = RecordingD()
    x = torch.zeros(B, 1, H, H)
    k = torch.zeros(B, dtype=torch.long)
    for scale in range(4):
        attn = attention_map(D, x, k, x, scale, (H, H))
        assert attn.shape == (B, 1, H, H)
        torch.testing.assert_close(attn, torch.full((B, 1, H, H), 20.0 * (scale + 1)))


def test_g_loss_target_is_x0_through_the_attention_weighted_pair():
    sched = make_schedule(CFG.num_steps, CFG.beta_min, CFG.beta_max)
    y, x0 = _batch()
    D, G = RecordingD(), ConstantG()
    out = g_loss(G, D, sched, y, x0, _draws(3), attn_scale=1)
    assert out.total.item() == pytest.approx(1.0)  # G predicts 0 and x0 is +-1: MSE against x0 is exactly 1
    torch.testing.assert_close(out.attn, torch.full((B, 1, H, H), 40.0))
    # G saw x_{k+1} of the pair built from attn * x0 (not from x0): replay the draws to rebuild it
    draws = _draws(3)
    k = draws.steps(B)
    draws.randn(x0.shape), draws.randn(x0.shape)
    _, xk1_att = sched.pair_from_noise(40.0 * x0, k, draws.randn(x0.shape), draws.randn(x0.shape))
    torch.testing.assert_close(G.seen[0], xk1_att)


def test_losses_on_the_tiny_networks_are_finite_and_differentiable():
    from cdal_fast.network.discriminator import Discriminator
    from cdal_fast.network.generator import Generator

    torch.manual_seed(0)
    G, D = Generator(CFG), Discriminator(CFG)
    sched = make_schedule(CFG.num_steps, CFG.beta_min, CFG.beta_max)
    y = torch.randn(B, CFG.img_channels, CFG.image_size, CFG.image_size)
    x0 = torch.ones(B, CFG.mask_channels, CFG.image_size, CFG.image_size)
    d = d_loss(G, D, sched, y, x0, _draws(), r1_gamma=1.0, apply_r1=True)
    d.total.backward()
    assert d.r1.item() > 0 and all(p.grad is None for p in G.parameters())  # G is not trained by D's loss
    g = g_loss(G, D, sched, y, x0, _draws(), CFG.attn_scale)
    g.total.backward()
    assert torch.isfinite(g.total) and any(p.grad is not None for p in G.parameters())


def test_g_loss_without_a_discriminator_reconstructs_the_plain_mask():
    """D=None (generator-only fine-tune): attention 1, G sees x_{k+1} of the pair built from x0 itself."""
    sched = make_schedule(CFG.num_steps, CFG.beta_min, CFG.beta_max)
    y, x0 = _batch()
    G = ConstantG()
    out = g_loss(G, None, sched, y, x0, _draws(5), attn_scale=1)
    assert out.total.item() == pytest.approx(1.0)
    torch.testing.assert_close(out.attn, torch.ones(B, 1, H, H))
    draws = _draws(5)  # draw order without D: k, the pair's two noises, z
    k = draws.steps(B)
    _, xk1 = sched.pair_from_noise(x0, k, draws.randn(x0.shape), draws.randn(x0.shape))
    torch.testing.assert_close(G.seen[0], xk1)
