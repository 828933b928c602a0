import copy

import pytest
import torch

from cdal_fast.network.config import get_preset
from cdal_fast.network.generator import Generator
from cdal_fast.sampling.sampler import FixedStepSampler, decode_mask, draw_noise, generators_from_seed, sample

from .conftest import perturbed


def test_shapes_and_ranges(tiny_gen, tiny_cfg):
    s = FixedStepSampler(tiny_gen)
    img = torch.randn(3, 3, 64, 64)
    prob, std = sample(s, img, seed=0)
    assert prob.shape == std.shape == (3, 1, 64, 64)
    assert prob.min() >= 0 and prob.max() <= 1 and std.min() >= 0 and std.max() <= 0.5
    assert decode_mask(prob).shape == (3, 64, 64)


def test_deterministic_and_no_global_rng(tiny_gen):
    s = FixedStepSampler(tiny_gen)
    img = torch.randn(2, 3, 64, 64)
    state = torch.get_rng_state()
    a = sample(s, img, seed=7)
    b = sample(s, img, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = sample(s, img, seed=8)
    assert not torch.equal(a[0], c[0])


def test_batch_independent(tiny_gen):
    """An image's result depends on its own generator only, not on the batch it is in."""
    s = FixedStepSampler(tiny_gen)
    img = torch.randn(3, 3, 64, 64)
    full = sample(s, img, seed=3)[0]
    gens = generators_from_seed(3, 3)[1:2]
    single = sample(s, img[1:2], generators=gens)[0]
    torch.testing.assert_close(full[1:2], single, rtol=1e-5, atol=1e-6)


def test_manual_loop_matches(tiny_gen, tiny_cfg):
    """The batched-vote sampler equals the literal algorithm of spec section 3, vote by vote."""
    from cdal_fast.network.diffusion import make_schedule

    s = FixedStepSampler(tiny_gen, votes=3)
    sched = make_schedule(s.num_steps)
    img = torch.randn(2, 3, 64, 64)
    gens = generators_from_seed(0, 2)
    n = draw_noise(s.num_steps, 3, 1, tiny_cfg.nz, 64, 64, gens)
    prob, std = s(img, n.x_init, n.z, n.post)
    ps = []
    for v in range(3):
        rows = slice(v * 2, v * 2 + 2)
        x = n.x_init[rows]
        for i, k in enumerate(reversed(range(s.num_steps))):
            kk = torch.full((2,), k)
            x0 = tiny_gen(x, kk, img, n.z[i, rows])
            x = sched.posterior_draw(x0, x, kk, n.post[i, rows])
        ps.append(((x + 1) / 2).clamp(0, 1))
    ps = torch.stack(ps)
    torch.testing.assert_close(prob, ps.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std, ps.std(0, unbiased=False), rtol=1e-4, atol=1e-5)


def test_multiclass_argmax():
    cfg = get_preset("tiny", mask_channels=3)
    torch.manual_seed(0)
    gen = perturbed(Generator(cfg)).eval()
    prob, _ = sample(FixedStepSampler(gen), torch.randn(2, 3, 64, 64), seed=1)
    assert prob.shape == (2, 3, 64, 64)
    mask = decode_mask(prob)
    assert mask.shape == (2, 64, 64) and mask.dtype == torch.uint8
    # hand-made probabilities: class 1 wins pixel 0, class 2 pixel 1, class 0 pixel 2
    known = torch.tensor([[0.2, 0.1, 0.5], [0.7, 0.3, 0.4], [0.1, 0.6, 0.1]]).reshape(1, 3, 1, 3)
    assert decode_mask(known).tolist() == [[[1, 2, 0]]]
    # binary: threshold at 0.5 inclusive
    assert decode_mask(torch.tensor([0.0, 0.49, 0.5, 0.51, 1.0]).reshape(1, 1, 1, 5)).tolist() == [[[0, 0, 1, 1, 1]]]


def test_torchscript_parity(tiny_gen):
    s = FixedStepSampler(tiny_gen)
    scripted = torch.jit.script(s)
    img = torch.randn(2, 3, 64, 64)
    a = sample(s, img, seed=5)
    b = sample(scripted, img, seed=5)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["eager", "torchscript"])
def test_bfloat16_sampler_agrees_with_float32(tiny_gen, backend):
    """Half-precision inference (what `segment --dtype bfloat16` runs) works and keeps the masks."""
    from cdal_fast.runtime.backends import build_sampler

    img = torch.randn(2, 3, 64, 64)
    ref = sample(FixedStepSampler(tiny_gen), img, seed=2)[0]
    s16 = build_sampler(copy.deepcopy(tiny_gen), None, None, backend, "cpu", torch.bfloat16)
    out = sample(s16, img.to(torch.bfloat16), seed=2)[0]
    assert out.dtype == torch.float32
    assert (decode_mask(out) == decode_mask(ref)).float().mean() > 0.95


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tiny_gen):
    s = FixedStepSampler(tiny_gen)
    img = torch.randn(2, 3, 64, 64)
    a = sample(s, img, seed=5)[0]
    b = sample(FixedStepSampler(tiny_gen).cuda(), img.cuda(), seed=5)[0].cpu()
    assert (a - b).abs().max() < 1e-3
