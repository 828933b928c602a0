"""ONNX sampler (onnxruntime) against the PyTorch sampler; TensorRT backend skips cleanly."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cdal_fast.cli import main
from cdal_fast.network.config import get_preset
from cdal_fast.network.generator import Generator
from cdal_fast.runtime.backends import BackendError, build_sampler
from cdal_fast.runtime.onnx_export import export_onnx, onnx_metadata
from cdal_fast.runtime.onnx_tensorrt import OnnxSampler
from cdal_fast.sampling.sampler import FixedStepSampler, decode_mask, draw_noise, generators_from_seed
from cdal_fast.weights import save_weights

from .conftest import perturbed

pytest.importorskip("onnxruntime")


def _gen(preset: str, seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return perturbed(Generator(get_preset(preset)), seed=seed).eval()


def test_export_with_tta_raises_no_tracer_warnings(tmp_path):
    """Shape branches (TTA's square-tile check) are exact for the fixed-size graph, so no "trace might
    be incorrect" warning reaches users of `segment`, whose auto backend exports on first use."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(_gen("tiny"), tmp_path / "s.onnx", steps=2, votes=2, tta=True)
    assert [w.category for w in caught if issubclass(w.category, torch.jit.TracerWarning)] == []
    assert onnx_metadata(tmp_path / "s.onnx")["cdal_tta"] == "1"


@pytest.mark.parametrize("preset", ["tiny", "hippocampus"])
def test_onnxruntime_matches_pytorch_on_same_noise(tmp_path, preset):
    gen = _gen(preset)
    path = export_onnx(gen, tmp_path / "s.onnx", weights_sha256="abc")
    ort_sampler = OnnxSampler(path, gen, "abc")
    ref = FixedStepSampler(gen).eval()
    cfg = gen.cfg
    s = cfg.image_size
    for batch in (1, 3):  # exported with batch 1; the batch axis is dynamic
        image = torch.randn(batch, cfg.img_channels, s, s)
        n = draw_noise(ref.num_steps, ref.votes, cfg.mask_channels, cfg.nz, s, s, generators_from_seed(4, batch))
        with torch.no_grad():
            p_ref, s_ref = ref(image, n.x_init, n.z, n.post)
        p_ort, s_ort = ort_sampler(image, n.x_init, n.z, n.post)
        assert (p_ort - p_ref).abs().max().item() <= 1e-4
        assert (s_ort - s_ref).abs().max().item() <= 1e-4
        assert torch.equal(decode_mask(p_ort), decode_mask(p_ref))


def test_graph_metadata_and_mismatch_errors(tmp_path):
    gen = _gen("tiny")
    path = export_onnx(gen, tmp_path / "s.onnx", weights_sha256="abc")
    s = OnnxSampler(path)
    assert (s.num_steps, s.votes, s.size) == (2, 2, 64)
    with pytest.raises(BackendError, match="different model"):
        OnnxSampler(path, Generator(get_preset("tiny", nf=32)))
    with pytest.raises(BackendError, match="other weights"):
        OnnxSampler(path, gen, "def")
    with pytest.raises(BackendError, match="exported for 64x64"):
        s(torch.zeros(1, 3, 32, 32), torch.zeros(2, 1, 32, 32), torch.zeros(2, 2, 8), torch.zeros(2, 2, 1, 32, 32))


def test_malformed_files(tmp_path):
    with pytest.raises(BackendError, match="not found"):
        OnnxSampler(tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(BackendError, match="not a valid ONNX model"):
        OnnxSampler(tmp_path / "bad.onnx")
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Linear(3, 2), (torch.zeros(1, 3),), str(plain), dynamo=False)
    with pytest.raises(BackendError, match="not a cdal-fast sampler graph"):
        OnnxSampler(plain)


def test_cli_export_onnx_and_segment_backend(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("CDAL_FAST_CACHE", str(tmp_path / "cache"))
    gen = _gen("tiny")
    save_weights(tmp_path / "w", gen, dtype=torch.float32)
    res = CliRunner().invoke(main, ["export", "--format", "onnx", "--weights", str(tmp_path / "w.safetensors"),
                                    "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.output
    assert OnnxSampler(tmp_path / "m.onnx").votes == 2
    rgb = (np.random.default_rng(1).random((150, 170, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    masks = {}
    for backend in ("eager", "onnx"):
        out = tmp_path / backend
        res = CliRunner().invoke(main, ["segment", str(tmp_path / "img.png"), "--out", str(out), "--weights",
                                        str(tmp_path / "w.safetensors"), "--mpp", "0.5", "--backend", backend,
                                        "--workers", "0", "-q"])
        assert res.exit_code == 0, res.output
        masks[backend] = np.asarray(Image.open(out / "img.mask.png"))
        # the one-time export says so (it is silent minutes on a large model); eager builds nothing
        assert ("once into" in res.output) == (backend == "onnx"), res.output
    assert (masks["eager"] == masks["onnx"]).mean() >= 0.9999
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx"))  # exported once, cached
    again = CliRunner().invoke(main, ["segment", str(tmp_path / "img.png"), "--out", str(tmp_path / "again"),
                                      "--weights", str(tmp_path / "w.safetensors"), "--mpp", "0.5", "--backend", "onnx",
                                      "--workers", "0", "-q"])
    assert again.exit_code == 0 and "once into" not in again.output, again.output


HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT present: the missing-TensorRT path cannot be shown here")
def test_tensorrt_missing_fails_at_start_with_one_clear_message(tmp_path):
    gen = _gen("tiny")
    with pytest.raises(BackendError, match="tensorrt backend needs"):
        build_sampler(gen, None, None, "tensorrt")
    save_weights(tmp_path / "w", gen, dtype=torch.float32)
    res = CliRunner().invoke(main, ["segment", str(tmp_path), "--out", str(tmp_path / "o"), "--weights",
                                    str(tmp_path / "w.safetensors"), "--backend", "tensorrt"])
    assert res.exit_code != 0 and "tensorrt backend needs" in res.output
    res = CliRunner().invoke(main, ["export", "--format", "tensorrt", "--weights", str(tmp_path / "w.safetensors"),
                                    "--out", str(tmp_path / "m.engine")])
    assert res.exit_code != 0 and "tensorrt backend needs" in res.output
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="needs TensorRT and an NVIDIA GPU")
def test_tensorrt_engine_matches_pytorch(tmp_path, monkeypatch):
    monkeypatch.setenv("CDAL_FAST_CACHE", str(tmp_path / "cache"))
    gen = _gen("tiny")
    trt_sampler = build_sampler(gen, None, None, "tensorrt", weights_sha256="abc")
    ref = FixedStepSampler(gen).eval()
    image = torch.randn(2, 3, 64, 64)
    n = draw_noise(ref.num_steps, ref.votes, 1, gen.cfg.nz, 64, 64, generators_from_seed(0, 2))
    with torch.no_grad():
        p_ref, _ = ref(image, n.x_init, n.z, n.post)
    p_trt, _ = trt_sampler(image, n.x_init, n.z, n.post)
    assert (p_trt.cpu() - p_ref).abs().max().item() <= 2e-2  # fp16 engine
    assert Path(next((tmp_path / "cache" / "engines").glob("*.engine"))).is_file()


def _fake_export(calls: list):
    def export(generator, path, steps, votes, weights_sha256="", precision="fp32", tta=False):
        calls.append((Path(path), weights_sha256))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"graph")
        return Path(path)
    return export


def test_onnx_cache_name_cannot_escape_and_only_verified_hashes_hit(tmp_path, monkeypatch):
    """A hostile preset name or claimed hash stays inside the cache; unverified weights always re-export."""
    import cdal_fast.runtime.onnx_cache as compiled
    import cdal_fast.runtime.onnx_cache as onnx_cache
    from cdal_fast.runtime.onnx_cache import cached_onnx

    cache = tmp_path / "deep" / "cache"
    monkeypatch.setenv("CDAL_FAST_CACHE", str(cache))
    calls: list = []
    monkeypatch.setattr(compiled, "export_onnx", _fake_export(calls))
    monkeypatch.setattr(onnx_cache, "_stale", lambda path: False)  # the fake graphs hold no metadata
    gen = Generator(get_preset("tiny").replace(name="../../../x"))
    digest = "ab" * 32
    path = cached_onnx(gen, None, None, digest)
    assert path.parent == cache / "onnx" and path.name == f"x-{digest[:32]}-T2-V2-S64.onnx"
    assert cached_onnx(gen, None, None, digest) == path and len(calls) == 1  # verified: reused
    assert calls[0][1] == digest
    for claim in ("", "../../../../etc/x", "not-a-hash"):
        p = cached_onnx(gen, None, None, claim)
        assert p.parent == cache / "onnx" / "unverified" / _host()
        assert calls[-1] == (p, "")  # exported afresh, and no claimed hash written into the graph
    assert len(calls) == 4
    assert sorted(f.name for f in tmp_path.rglob("*") if f.is_file()) == sorted(
        {c[0].name for c in calls})  # nothing written anywhere else


def test_export_copies_to_cpu_float32_and_keeps_norm_statistics_in_float32(tmp_path):
    """segment holds the generator on the GPU in bfloat16 with fused ops; exporting must neither trace
    those tensors nor change them. A bfloat16, fused caller stands in for the CUDA-placed one here."""
    import onnx

    gen = _gen("tiny").to(torch.bfloat16).set_fused(True)
    fused_before = [m.fused for m in gen.modules() if hasattr(m, "fused")]
    params_before = {k: v.clone() for k, v in gen.state_dict().items()}
    path = export_onnx(gen, tmp_path / "s16.onnx", weights_sha256="abc", precision="fp16")
    assert all(v.dtype == torch.bfloat16 for v in gen.state_dict().values())
    assert [m.fused for m in gen.modules() if hasattr(m, "fused")] == fused_before
    assert all(torch.equal(params_before[k], v) for k, v in gen.state_dict().items())
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert "InstanceNormalization" not in ops and ops.count("GroupNormalization") >= 1
    producers = {o: n for n in graph.node for o in n.output}
    for node in (n for n in graph.node if n.op_type == "GroupNormalization"):
        cast = producers[node.input[0]]  # statistics of every group norm are taken in float32
        assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT
    assert {i.type.tensor_type.elem_type for i in (*graph.input, *graph.output)} == {onnx.TensorProto.FLOAT}
    ref = FixedStepSampler(_gen("tiny")).eval()  # the same weights in float32
    image = torch.randn(2, 3, 64, 64)
    n = draw_noise(ref.num_steps, ref.votes, 1, ref.nz, 64, 64, generators_from_seed(1, 2))
    with torch.no_grad():
        p_ref, _ = ref(image, n.x_init, n.z, n.post)
    p16, _ = OnnxSampler(path, gen, "abc")(image, n.x_init, n.z, n.post)
    # bf16 caller weights (8-bit mantissa) exported as fp16, run in fp16: a few 1e-2 at most
    assert (p16 - p_ref).abs().max().item() <= 5e-2


def _host() -> str:
    import socket

    from cdal_fast.runtime.onnx_cache import _safe_name

    return _safe_name(socket.gethostname())


def test_private_graphs_of_ended_processes_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    """Every unverified run exports its own ~30 MB graph; the next unverified export deletes those of
    processes that have ended, never a running process's (it may still be reading it)."""
    import subprocess
    import sys

    import cdal_fast.runtime.onnx_cache as compiled
    import cdal_fast.runtime.onnx_cache as onnx_cache
    from cdal_fast.runtime.onnx_cache import cached_onnx

    cache = tmp_path / "cache"
    monkeypatch.setenv("CDAL_FAST_CACHE", str(cache))
    monkeypatch.setattr(compiled, "export_onnx", _fake_export([]))
    monkeypatch.setattr(onnx_cache, "_stale", lambda path: False)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    folder = cache / "onnx" / "unverified" / _host()
    folder.mkdir(parents=True)
    other_host = cache / "onnx" / "unverified" / "another-node"  # a shared cache: its pids mean nothing here
    other_host.mkdir()
    foreign = other_host / f"tiny-pid{int(ended.stdout)}-T2-V2-S64.onnx"
    foreign.write_bytes(b"x")
    tricky = folder / f"x-pid{int(ended.stdout)}-y-pid{os.getpid()}-T2-V2-S64.onnx"  # owner: the last -pidN-T
    dead = folder / f"tiny-pid{int(ended.stdout)}-T2-V2-S64.onnx"
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as alive_proc:
        try:
            alive = folder / f"tiny-pid{alive_proc.pid}-T2-V2-S64.onnx"
            unrelated = folder / "notes.txt"
            for f in (dead, alive, unrelated, tricky):
                f.write_bytes(b"x")
            own = cached_onnx(Generator(get_preset("tiny")), None, None, "")
            assert own.parent == folder and own.name == f"tiny-pid{os.getpid()}-T2-V2-S64.onnx"
            assert not dead.exists() and alive.exists() and unrelated.exists()
            assert foreign.exists() and tricky.exists()
        finally:
            alive_proc.kill()
