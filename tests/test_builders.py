"""Sampler builders leave the caller's generator as it was; flag combinations that cannot be honoured are refused."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from cdal_fast.cli import main
from cdal_fast.network import ops
from cdal_fast.network.config import get_preset
from cdal_fast.network.generator import Generator
from cdal_fast.network.layers import AdaGNSiLU
from cdal_fast.runtime.backends import BackendError, build_sampler


def _fused_flags(g: Generator) -> set[bool]:
    return {m.fused for m in g.modules() if isinstance(m, AdaGNSiLU)}


@pytest.mark.skipif(not ops.extension_available(), reason="C++ extension not built")
def test_fused_backend_does_not_change_the_callers_generator():
    g = Generator(get_preset("tiny")).eval()
    s = build_sampler(g, 1, 1, "fused")
    assert _fused_flags(g) == {False} and _fused_flags(s.generator) == {True}
    # the copy shares the weights: no parameter memory is duplicated
    assert next(s.generator.parameters()) is next(g.parameters())
    g.set_fused(True)  # and a later change of the caller's model does not reach the built sampler
    plain = build_sampler(g, 1, 1, "eager")
    assert _fused_flags(plain.generator) == {False} and _fused_flags(g) == {True}


def test_casting_builder_leaves_the_callers_weights_in_float32():
    g = Generator(get_preset("tiny")).eval()
    s = build_sampler(g, 1, 1, "eager", dtype=torch.bfloat16)
    assert next(g.parameters()).dtype == torch.float32
    assert next(s.generator.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["onnx", "tensorrt"])
def test_export_refuses_fused_for_plain_op_graphs(tmp_path, fmt):
    res = CliRunner().invoke(main, ["export", "--format", fmt, "--fused", "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code != 0 and f"--fused cannot be honoured by --format {fmt}" in res.output
    assert not list(tmp_path.iterdir())


def test_channels_last_sampler_converts_a_copy_and_keeps_the_results():
    g = Generator(get_preset("tiny")).eval()
    from .conftest import perturbed

    perturbed(g)
    img = torch.randn(2, 3, 64, 64)
    cl = build_sampler(g, None, None, "eager", channels_last=True)
    assert next(g.parameters()) is not next(cl.generator.parameters())
    assert all(p.is_contiguous() for p in g.parameters())  # the caller's layout is untouched
    conv = next(m for m in cl.generator.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    from cdal_fast.sampling.sampler import sample

    ref = sample(build_sampler(g, None, None, "eager"), img, seed=1)
    out = sample(cl, img, seed=1)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["onnx", "tensorrt"])
def test_fusion_and_layout_are_refused_for_compiled_graph_backends(backend):
    g = Generator(get_preset("tiny")).eval()
    for kwargs in ({"fused": True}, {"channels_last": True}):
        with pytest.raises(BackendError, match=f"--backend {backend} runs a compiled graph"):
            build_sampler(g, None, None, backend, **kwargs)
    with pytest.raises(BackendError, match="the fused backend always runs the fused ops"):
        build_sampler(g, None, None, "fused", fused=False)


def test_onnx_on_a_gpu_without_onnxruntime_gpu_is_refused_not_run_on_the_cpu(tmp_path, monkeypatch):
    """A plain onnxruntime has only the CPU provider: --device cuda --backend onnx must say so at
    start (before any export), not silently sample on the CPU."""
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime can run on CUDA")
    monkeypatch.setenv("CDAL_FAST_CACHE", str(tmp_path))
    g = Generator(get_preset("tiny")).eval()
    with pytest.raises(BackendError, match="needs onnxruntime-gpu"):
        build_sampler(g, None, None, "onnx", "cuda")
    assert not list(tmp_path.iterdir())  # refused before exporting anything
    from cdal_fast.runtime.onnx_tensorrt import onnx_providers

    assert onnx_providers("cpu") == ["CPUExecutionProvider"]


def test_tensorrt_engine_precision_follows_dtype():
    from cdal_fast.runtime.backends import TRT_PRECISION

    # --dtype float32 must not quietly build a half-precision engine
    assert TRT_PRECISION == {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
