"""Structural fidelity: exact parameter counts and FLOPs of the published networks."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cdal_fast.network.config import get_preset
from cdal_fast.network.discriminator import Discriminator
from cdal_fast.network.generator import Generator


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("preset,g_params,d_params", [
    ("monuseg", 41_666_753, 27_736_705),
    ("cxr", 8_843_777, 27_736_705),
    ("hippocampus", 2_691_971, 12_462_849),
])
def test_parameter_counts(preset, g_params, d_params):
    cfg = get_preset(preset)
    with torch.device("meta"):
        assert _count(Generator(cfg)) == g_params
        assert _count(Discriminator(cfg)) == d_params


@pytest.mark.parametrize("preset,gflop,enc_gflop", [("monuseg", 163.9, 48.5), ("cxr", 39.8, 14.5)])
def test_generator_flops(preset, gflop, enc_gflop):
    cfg = get_preset(preset)
    with torch.device("meta"):
        g = Generator(cfg)
        s = cfg.image_size
        x = torch.zeros(1, cfg.mask_channels, s, s)
        y = torch.zeros(1, cfg.img_channels, s, s)
        z = torch.zeros(1, cfg.nz)
        k = torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as total:
            g(x, k, y, z)
        with FlopCounterMode(display=False) as enc:
            g.encode(y)
    assert total.get_total_flops() / 1e9 == pytest.approx(gflop, rel=0.01)
    assert enc.get_total_flops() / 1e9 == pytest.approx(enc_gflop, rel=0.01)


def test_forward_shapes_and_output_head(tiny_gen, tiny_cfg):
    """The output is tanh(head conv): with the head's weights zeroed and bias 0.5 every pixel is tanh(0.5)."""
    import copy

    b, s = 3, tiny_cfg.image_size
    x = torch.randn(b, 1, s, s)
    y = torch.randn(b, 3, s, s)
    out = tiny_gen(x, torch.tensor([0, 1, 1]), y, torch.randn(b, tiny_cfg.nz))
    assert out.shape == (b, 1, s, s)
    g = copy.deepcopy(tiny_gen)
    with torch.no_grad():
        g.head_conv.weight.zero_()
        g.head_conv.bias.fill_(0.5)
    out = g(x, torch.tensor([0, 1, 1]), y, torch.randn(b, tiny_cfg.nz))
    torch.testing.assert_close(out, torch.full((b, 1, s, s), 0.46211715726000974))  # tanh(0.5)


def test_encode_denoise_equals_forward(tiny_gen, tiny_cfg):
    s = tiny_cfg.image_size
    x, y, z = torch.randn(2, 1, s, s), torch.randn(2, 3, s, s), torch.randn(2, tiny_cfg.nz)
    k = torch.tensor([1, 0])
    torch.testing.assert_close(tiny_gen(x, k, y, z), tiny_gen.denoise(x, k, tiny_gen.encode(y), z),
                               rtol=0, atol=0)


def test_discriminator_shapes_and_features():
    cfg = get_preset("tiny")
    d = Discriminator(cfg)
    s = cfg.image_size
    xk, xk1 = torch.randn(4, 1, s, s), torch.randn(4, 1, s, s)
    k = torch.tensor([0, 1, 0, 1])
    assert d(xk, k, xk1).shape == (4, 1)
    feats = d.features(xk, k, xk1)
    assert len(feats) == 1 + len(d.blocks)
    assert not feats[cfg.attn_scale].requires_grad
