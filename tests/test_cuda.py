"""The CUDA paths on a GPU: kernel registration, CUDA-graph replay, the fused sampler, channels-last
attention, torch.compile and pinned noise, each against eager PyTorch in the same dtype on the same noise.

Skipped without a CUDA device (CI); ``scripts/gpu_check.sh`` runs them on a lent GPU. Float32 parity
is checked with TF32 off: cuDNN's default TF32 convolutions round inputs to 10 mantissa bits, which
would fail 1e-4 tolerances without any fault in the code under test.
"""

from __future__ import annotations

import pytest
import torch

from cdal_fast.metrics import dice_iou
from cdal_fast.network import ops
from cdal_fast.network.config import get_preset
from cdal_fast.network.generator import Generator
from cdal_fast.runtime.backends import build_sampler
from cdal_fast.runtime.graphs import GraphedSampler
from cdal_fast.sampling.sampler import decode_mask, draw_noise, generators_from_seed

from .conftest import perturbed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
needs_ops = pytest.mark.skipif(not ops.extension_available(), reason="C++ extension not built")

CUDA = torch.device("cuda")
# float32 without TF32: plain and fused ops differ only in summation order; bfloat16: 8 mantissa bits
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(scope="module")
def gen() -> Generator:
    torch.manual_seed(0)
    return perturbed(Generator(get_preset("tiny"))).eval().to(CUDA)


def run(sampler, batch: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler on ``batch`` seeded tiles (tile i's image and noise do not depend on ``batch``)."""
    images = torch.stack([torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(100 + i))
                          for i in range(batch)])
    n = draw_noise(sampler.num_steps, sampler.votes, 1, sampler.nz, 64, 64, generators_from_seed(seed, batch))
    n = n.to(CUDA, dtype)
    with torch.inference_mode():
        prob, std = sampler(images.to(CUDA, dtype), n.x_init, n.z, n.post)
    return prob.float().cpu(), std.float().cpu()


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(a, b, atol=TOL[dtype], rtol=0)


@needs_ops
def test_cuda_kernels_are_registered():
    """A build that silently left out CUDA shows up here, not later as NotImplementedError."""
    for op in ("adagn_silu", "self_attention"):
        dump = torch._C._dispatch_dump(f"cdal::{op}")
        keys = {line.split(":")[0] for line in dump.splitlines() if ": registered at" in line}
        assert {"CPU", "CUDA", "Meta"} <= keys, f"cdal::{op}: {sorted(keys)}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_ops)])
def test_graph_replay_matches_eager_including_a_padded_last_batch(gen, dtype, fused):
    eager = build_sampler(gen, None, None, "fused" if fused else "eager", CUDA, dtype)
    graphs = build_sampler(gen, None, None, "graphs", CUDA, dtype, fused=fused)
    assert isinstance(graphs, GraphedSampler)
    for batch in (4, 3):  # 4 is captured; the slide's smaller last batch of 3 replays it padded
        got, want = run(graphs, batch, dtype), run(eager, batch, dtype)
        close(got[0], want[0], dtype)
        close(got[1], want[1], dtype)
    assert [k[0] for k in graphs._graphs] == [4]  # one capture served both batch sizes


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_sampler_matches_plain_on_cuda(gen, dtype):
    plain = run(build_sampler(gen, None, None, "eager", CUDA, dtype), 4, dtype)
    fused = run(build_sampler(gen, None, None, "fused", CUDA, dtype), 4, dtype)
    close(fused[0], plain[0], dtype)
    close(fused[1], plain[1], dtype)


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_op_in_channels_last_matches_the_reference(dtype):
    g = torch.Generator().manual_seed(3)
    c, groups = 64, 16
    x = torch.randn(4, c, 16, 16, generator=g).to(CUDA, dtype).contiguous(memory_format=torch.channels_last)
    args = [1 + 0.1 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g),
            torch.randn(3 * c, c, 1, 1, generator=g) / c**0.5, 0.1 * torch.randn(3 * c, generator=g),
            torch.randn(c, c, 1, 1, generator=g) / c**0.5, 0.1 * torch.randn(c, generator=g)]
    args = [a.to(CUDA, dtype) for a in args]
    out = ops.self_attention(x, *args, groups, 1e-6)
    ref = ops.self_attention_reference(x.contiguous().double(), *(a.double() for a in args), groups, 1e-6)
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("backend", ["eager", pytest.param("fused", marks=needs_ops), "graphs"])
def test_channels_last_sampler_matches_contiguous(gen, backend):
    dtype = torch.bfloat16
    cl = run(build_sampler(gen, None, None, backend, CUDA, dtype, channels_last=True), 2, dtype)
    plain = run(build_sampler(gen, None, None, backend, CUDA, dtype), 2, dtype)
    close(cl[0], plain[0], dtype)


def test_bfloat16_masks_agree_with_float32(gen):
    """The rule a reduced-precision default must meet: mask Dice >= 0.99 against float32 on the same noise."""
    ref = run(build_sampler(gen, None, None, "eager", CUDA, torch.float32), 4, torch.float32)[0]
    low = run(build_sampler(gen, None, None, "graphs", CUDA, torch.bfloat16), 4, torch.bfloat16)[0]
    dice, _ = dice_iou(decode_mask(low) > 0, decode_mask(ref) > 0)
    assert dice >= 0.99


def test_noise_is_pinned_for_asynchronous_copies():
    n = draw_noise(2, 3, 1, 8, 16, 16, generators_from_seed(0, 2))
    pinned = n.pin_memory()
    assert all(t.is_pinned() for t in (pinned.x_init, pinned.z, pinned.post))
    on_gpu = pinned.to(CUDA, torch.bfloat16, non_blocking=True)
    torch.cuda.synchronize()
    torch.testing.assert_close(on_gpu.post.float().cpu(), n.post.to(torch.bfloat16).float())


@needs_ops
def test_adagn_refuses_a_sample_whose_index_would_wrap():
    """One sample of 2^31 elements: a 32-bit grid-stride index could wrap past 2^32, so the op refuses."""
    x = torch.empty(1, 2, 32768, 32768, device=CUDA, dtype=torch.bfloat16)
    ones = torch.ones(1, 2, device=CUDA)
    with pytest.raises(RuntimeError, match="indexes one sample with 32 bits"):
        ops.adagn_silu(x, ones, ones, None, 1, 1e-6)


def test_compile_matches_eager_on_cuda(gen):
    """torch.compile of the whole sampler (last: compiling takes the longest)."""
    dtype = torch.float32
    compiled = run(build_sampler(gen, None, None, "compile", CUDA, dtype), 2, dtype)
    eager = run(build_sampler(gen, None, None, "eager", CUDA, dtype), 2, dtype)
    close(compiled[0], eager[0], dtype)
    close(compiled[1], eager[1], dtype)
