"""Reduced precision on a CPU: what the CPU can do natively, and the static int8 sampler graph that
only CPUs with VNNI run (refused elsewhere, with the reason), checked against float32 on the same noise."""

from __future__ import annotations

import pytest
import torch

from cdal_fast.job import backend_used
from cdal_fast.metrics import dice_iou
from cdal_fast.runtime import backends
from cdal_fast.runtime.backends import BackendError, build_sampler
from cdal_fast.runtime.cpu_features import CpuFeatures, cpu_features
from cdal_fast.sampling.sampler import decode_mask, sample

AVX2_ONLY = "processor\t: 0\nmodel name\t: Old CPU\nflags\t\t: fpu sse avx avx2 fma\n\nprocessor\t: 1\nflags\t: x\n"
SAPPHIRE = "model name\t: New CPU\nflags\t\t: avx2 fma avx512f avx512_bf16 avx512_vnni amx_bf16 amx_int8\n"


def test_cpu_features_are_read_from_the_first_processor():
    old, new = CpuFeatures.parse(AVX2_ONLY, "avx2"), CpuFeatures.parse(SAPPHIRE, "amx")
    assert old.model == "Old CPU" and "avx2" in old.flags and "x" not in old.flags
    assert (old.native_bf16, old.vnni) == (False, False)
    assert (new.native_bf16, new.vnni) == (True, True)
    assert "native bf16 yes, int8 VNNI yes" in new.describe() and "PyTorch ISA amx" in new.describe()
    assert "native bf16 no, int8 VNNI no" in old.describe()
    assert isinstance(cpu_features().vnni, bool)  # this machine's, whatever it has


def test_int8_is_refused_without_vnni_and_off_the_cpu(tiny_gen, monkeypatch):
    monkeypatch.setattr(backends, "cpu_features", lambda: CpuFeatures.parse(AVX2_ONLY))
    with pytest.raises(BackendError, match="needs a CPU with VNNI .*Old CPU"):
        build_sampler(tiny_gen, None, None, "onnx_int8")
    with pytest.raises(BackendError, match="runs on a CPU"):
        build_sampler(tiny_gen, None, None, "onnx_int8", "cuda")


@pytest.mark.slow
@pytest.mark.skipif(not cpu_features().vnni, reason="this CPU has no VNNI: the int8 graph is refused here")
def test_int8_graph_is_cached_and_its_masks_follow_float32(tiny_gen, tmp_path, monkeypatch):
    monkeypatch.setenv("CDAL_FAST_CACHE", str(tmp_path))
    img = torch.randn(2, 3, 64, 64)
    q = build_sampler(tiny_gen, None, None, "onnx_int8", weights_sha256="ab" * 32)
    assert q.quantisation.startswith("int8-static-qdq") and backend_used(q, "auto") == "auto -> onnx_int8"
    files = sorted(p.name for p in (tmp_path / "onnx").glob("*.onnx"))
    assert len(files) == 2 and any("-int8-" in f for f in files)  # the float32 graph and its int8 one
    again = build_sampler(tiny_gen, None, None, "onnx_int8", weights_sha256="ab" * 32)
    assert sorted(p.name for p in (tmp_path / "onnx").glob("*.onnx")) == files  # reused, not quantised again
    ref = sample(build_sampler(tiny_gen, None, None, "eager"), img)[0]
    low = sample(again, img)[0]
    assert dice_iou(decode_mask(low) > 0, decode_mask(ref) > 0)[0] > 0.9  # tiny random weights: a loose bound


def test_auto_takes_int8_only_for_a_validated_model_on_a_vnni_cpu(monkeypatch):
    from cdal_fast.network.config import get_preset
    from cdal_fast.runtime import backend_choice

    validated, other = get_preset("tiny", cpu_int8=True), get_preset("tiny")
    monkeypatch.setattr(backend_choice, "cpu_features", lambda: CpuFeatures.parse(SAPPHIRE))
    choice = backend_choice.resolve_backend("cpu", torch.float32, validated)
    assert choice.backend == "onnx_int8" and "VNNI" in choice.reason
    assert backend_choice.resolve_backend("cpu", torch.float32, other).backend == "onnx"
    assert backend_choice.resolve_backend("cpu", torch.bfloat16, validated).backend == "eager"
    monkeypatch.setattr(backend_choice, "cpu_features", lambda: CpuFeatures.parse(AVX2_ONLY))
    assert backend_choice.resolve_backend("cpu", torch.float32, validated).backend == "onnx"
    assert validated.architecture_dict() == other.architecture_dict()  # an inference choice, not the network
