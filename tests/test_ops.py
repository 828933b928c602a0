"""The cdal custom ops against their plain-PyTorch compositions (CPU here, CUDA when present)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cdal_fast.network import ops
from cdal_fast.network.config import get_preset
from cdal_fast.network.generator import Generator
from cdal_fast.sampling.sampler import FixedStepSampler, sample

from .conftest import perturbed

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="C++ extension not built")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# float32: rel. error <= 1e-5; half types: <= 1e-2 (the tolerances), relative to max |ref|
DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-12)).item()


def adagn_inputs(n, c, h, w, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g) * 3 + 1
    gamma = 1 + 0.3 * torch.randn(n, c, generator=g)
    beta = 0.5 * torch.randn(n, c, generator=g)
    b = torch.randn(n, c, generator=g) if bias else None
    return x, gamma, beta, b


ADAGN_CASES = [
    ((1, 12, 8, 8), 3, True),       # batch 1, 8x8, channels not a multiple of 8
    ((3, 20, 64, 64), 5, False),    # 64x64, no bias
    ((2, 36, 9, 13), 9, True),      # odd spatial size
    ((2, 64, 16, 16), 16, True),
]
ATTN_CASES = [((1, 12, 8, 8), 3), ((2, 68, 8, 8), 17), ((1, 64, 16, 16), 16), ((1, 20, 32, 32), 5)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape,groups,bias", ADAGN_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_adagn_silu_parity(device, dtype, tol, shape, groups, bias, channels_last):
    x, gamma, beta, b = adagn_inputs(*shape, bias=bias)
    ref = ops.adagn_silu_reference(x.double(), gamma.double(), beta.double(),
                                   None if b is None else b.double(), groups, 1e-6)
    xd = x.to(device, dtype)
    if channels_last:
        xd = xd.contiguous(memory_format=torch.channels_last)
    out = ops.adagn_silu(xd, gamma.to(device), beta.to(device), None if b is None else b.to(device), groups, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    # half types: compare with the reference on the same rounded input
    if dtype != torch.float32:
        ref = ops.adagn_silu_reference(xd.float().cpu().double(), gamma.double(), beta.double(),
                                       None if b is None else b.double(), groups, 1e-6)
    assert rel_err(out.cpu(), ref) <= tol


def attn_inputs(n, c, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    return (x, 1 + 0.1 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g),
            torch.randn(3 * c, c, 1, 1, generator=g) / c**0.5, 0.1 * torch.randn(3 * c, generator=g),
            torch.randn(c, c, 1, 1, generator=g) / c**0.5, 0.1 * torch.randn(c, generator=g))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape,groups", ATTN_CASES)
def test_self_attention_parity(device, dtype, tol, shape, groups):
    args = attn_inputs(*shape)
    ref = ops.self_attention_reference(*[a.double() for a in args], groups, 1e-6)
    dev_args = [args[0].to(device, dtype)] + [a.to(device, dtype) for a in args[1:]]
    out = ops.self_attention(*dev_args, groups, 1e-6)
    assert out.dtype == dtype and out.shape == args[0].shape
    if dtype != torch.float32:
        ref = ops.self_attention_reference(*[a.to(dtype).double() for a in args], groups, 1e-6)
    assert rel_err(out.cpu(), ref) <= tol


# torch.library.opcheck: schema, fake (Meta) kernel strides/shapes against the real kernel, autograd
# registration and AOT dispatch, over the parity inputs (float32; the kernels are dtype-generic).
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,groups,bias", ADAGN_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_adagn_silu_opcheck(device, shape, groups, bias, channels_last):
    x, gamma, beta, b = adagn_inputs(*shape, bias=bias)
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = (x, gamma.to(device), beta.to(device), None if b is None else b.to(device), groups, 1e-6)
    torch.library.opcheck(torch.ops.cdal.adagn_silu.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,groups", ATTN_CASES)
def test_self_attention_opcheck(device, shape, groups):
    args = tuple(a.to(device) for a in attn_inputs(*shape))
    torch.library.opcheck(torch.ops.cdal.self_attention.default, (*args, groups, 1e-6))


def test_clear_errors():
    x, gamma, beta, b = adagn_inputs(1, 12, 8, 8)
    with pytest.raises(RuntimeError, match="divisible by groups"):
        ops.adagn_silu(x, gamma, beta, b, 5, 1e-6)
    with pytest.raises(RuntimeError, match="gamma must be"):
        ops.adagn_silu(x, gamma[:, :4], beta, b, 3, 1e-6)
    with pytest.raises(RuntimeError, match="must be floating point"):
        ops.adagn_silu(x.long(), gamma, beta, b, 3, 1e-6)


def test_every_argument_is_checked_for_device_and_dtype():
    """The CUDA kernels take raw pointers: an argument on another device than x, or an integer one,
    must be refused by the shared checks (here through the Meta kernel, which a meta argument selects)."""
    x, gamma, beta, b = adagn_inputs(1, 12, 8, 8)
    with pytest.raises(RuntimeError, match=r"adagn_silu: beta is on meta but x is on cpu"):
        ops.adagn_silu(x, gamma, beta.to("meta"), b, 3, 1e-6)
    with pytest.raises(RuntimeError, match=r"adagn_silu: bias must be floating point, got Long"):
        ops.adagn_silu(x, gamma, beta, b.long(), 3, 1e-6)
    args = attn_inputs(1, 12, 4, 4)
    with pytest.raises(RuntimeError, match=r"self_attention: proj_w is on meta but x is on cpu"):
        ops.self_attention(*args[:5], args[5].to("meta"), args[6], 3, 1e-6)
    with pytest.raises(RuntimeError, match=r"self_attention: qkv_b must be floating point, got Int"):
        ops.self_attention(*args[:4], args[4].int(), *args[5:], 3, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 12, 8, 8), (2, 12, 0, 8)])
def test_empty_inputs_return_empty_outputs(device, shape):
    x, gamma, beta, b = (t.to(device) for t in adagn_inputs(*shape))
    out = ops.adagn_silu(x, gamma, beta, b, 3, 1e-6)
    assert out.shape == shape and out.device == x.device
    args = [a.to(device) for a in attn_inputs(*shape)]
    assert ops.self_attention(*args, 3, 1e-6).shape == shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape,groups,dtype,channels_last,tol", [
    ((320, 64, 256, 256), 16, torch.bfloat16, True, 1e-2),   # batch 64 x 5 votes: grid-stride loops
    ((320, 64, 256, 256), 16, torch.bfloat16, False, 1e-2),
    ((2, 32, 64, 96), 8, torch.float32, True, 1e-5),          # several pixel chunks per sample
    ((3, 24, 48, 48), 6, torch.float32, True, 1e-5),          # C does not divide the block: generic path
])
def test_adagn_silu_cuda_at_sampler_scale(shape, groups, dtype, channels_last, tol):
    g = torch.Generator(device="cuda").manual_seed(0)
    n, c = shape[:2]
    x = (torch.randn(shape, generator=g, device="cuda") * 3 + 1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gamma, beta, b = (1 + 0.3 * torch.randn(n, c, generator=g, device="cuda") for _ in range(3))
    out = ops.adagn_silu(x, gamma, beta, b, groups, 1e-6)
    ref = ops.adagn_silu_reference(x.float(), gamma, beta, b, groups, 1e-6)
    assert rel_err(out, ref) <= tol
    with pytest.raises(RuntimeError, match="gamma is on cpu but x is on cuda"):
        ops.adagn_silu(x, gamma.cpu(), beta, b, groups, 1e-6)


def test_fake_impl_traces_with_export():
    class M(torch.nn.Module):
        def forward(self, x, gamma, beta):
            return torch.ops.cdal.adagn_silu(x, gamma, beta, None, 3, 1e-6)

    x, gamma, beta, _ = adagn_inputs(2, 12, 8, 8)
    ep = torch.export.export(M(), (x, gamma, beta))
    assert "cdal.adagn_silu" in str(ep.graph)
    torch.testing.assert_close(ep.module()(x, gamma, beta), M()(x, gamma, beta))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fx = torch.empty(2, 12, 8, 8)
        out = torch.ops.cdal.self_attention(fx, torch.empty(12), torch.empty(12), torch.empty(36, 12, 1, 1),
                                            None, torch.empty(12, 12, 1, 1), None, 3, 1e-6)
        assert out.shape == (2, 12, 8, 8)


@pytest.mark.parametrize("preset", ["tiny", "hippocampus"])
def test_fused_model_matches_plain_sampler(preset):
    """Same weights, same seed: the fused and plain paths give the same sampler output."""
    torch.manual_seed(0)
    cfg = get_preset(preset)
    g = perturbed(Generator(cfg)).eval()
    s = cfg.image_size
    img = torch.randn(2, cfg.img_channels, s, s)
    plain = sample(FixedStepSampler(g), img, seed=3)
    g.set_fused(True)
    fused = sample(FixedStepSampler(g), img, seed=3)
    scripted = sample(torch.jit.script(FixedStepSampler(g)), img, seed=3)
    for a, b in ((plain, fused), (plain, scripted)):
        assert rel_err(b[0], a[0]) <= 1e-5
        assert (b[1] - a[1]).abs().max() <= 1e-5
    assert "cdal::adagn_silu" in torch.jit.script(g.mid0.norm0).inlined_graph.__str__()


def test_set_fused_without_extension_keeps_plain_path(monkeypatch):
    from cdal_fast.network import op_library

    monkeypatch.setattr(op_library, "_STATUS", op_library.ExtensionStatus(op_library.PLAIN, "the test says so"))
    g = Generator(get_preset("tiny")).set_fused(True)
    assert not g.mid0.norm0.fused
    torch.jit.script(FixedStepSampler(g))  # the custom op is never referenced


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    """CI has nvcc but no GPU and a CPU torch: the torch-free kernels must still compile."""
    for cu in sorted((REPO / "csrc" / "cuda").glob("*.cu")):
        proc = subprocess.run(["nvcc", "-std=c++17", "-O2", "-arch=sm_90", "-c", str(cu), "-o",
                               str(tmp_path / (cu.stem + ".o"))], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake")
def test_cmake_builds_the_same_op_library(tmp_path):
    """CMakeLists.txt builds libcdal_ops for C++ apps; loaded alone it provides torch.ops.cdal.*."""
    import sys

    import torch.utils

    build = tmp_path / "build"
    cfg = subprocess.run(["cmake", "-S", str(REPO), "-B", str(build),
                          f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                         capture_output=True, text=True, timeout=600)
    assert cfg.returncode == 0, cfg.stdout[-2000:] + cfg.stderr[-2000:]
    bld = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, timeout=900)
    assert bld.returncode == 0, bld.stdout[-3000:] + bld.stderr[-2000:]
    lib = build / "libcdal_ops.so"
    assert lib.is_file()
    code = (
        f"import torch; torch.ops.load_library({str(lib)!r}); x = torch.randn(1, 8, 4, 4); g = torch.ones(1, 8); "
        "b = torch.zeros(1, 8); y = torch.ops.cdal.adagn_silu(x, g, b, None, 2, 1e-6); "
        "ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 2, eps=1e-6)); "
        "print(float((y - ref).abs().max()))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.strip().splitlines()[-1]) < 1e-5
