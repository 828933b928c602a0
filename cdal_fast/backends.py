"""Sampler backends selectable from the CLI (``--backend``).

* ``eager``: the plain PyTorch modules.
* ``torchscript``: the same sampler through ``torch.jit.script`` (what the C++ export ships).
* ``fused``: eager with latent modulation and attention routed through the ``cdal`` custom ops.
* ``compile``: ``torch.compile`` of the sampler (useful on GPUs; compiles on first use).
* ``onnx``: the unrolled sampler as an ONNX graph run by onnxruntime (exported once, cached).
* ``tensorrt``: a TensorRT engine built from that graph (cached; needs a GPU and TensorRT).

Backends that need something missing fail at start with one message saying what to install.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import ops
from .generator import Generator
from .sampler import FixedStepSampler

__all__ = ["BACKENDS", "BackendError", "build_sampler"]

BACKENDS = ("eager", "torchscript", "fused", "compile", "onnx", "tensorrt")


class BackendError(RuntimeError):
    """The requested backend cannot run here."""


def build_sampler(generator: Generator, steps: int | None, votes: int | None, backend: str = "eager",
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  weights_sha256: str = "") -> torch.nn.Module:
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend in ("onnx", "tensorrt"):
        return _compiled_sampler(generator, steps, votes, backend, weights_sha256)
    if backend == "fused":
        if not ops.extension_available():
            raise BackendError("backend 'fused' needs the C++ op library: run `bash scripts/setup.sh` "
                               "(or `pip install --no-build-isolation -e .`) to build it")
        generator.set_fused(True)
    else:
        generator.set_fused(False)
    sampler = FixedStepSampler(generator, steps, votes).to(device=device, dtype=dtype).eval()
    # the schedule tables stay float32 whatever the compute dtype
    for name in ("c1", "c2", "post_std"):
        setattr(sampler, name, getattr(sampler, name).float())
    if backend == "torchscript":
        return torch.jit.script(sampler)
    if backend == "compile":
        return torch.compile(sampler, dynamic=False)
    return sampler


def cached_onnx(generator: Generator, steps: int | None, votes: int | None, weights_sha256: str) -> Path:
    """The sampler's ONNX graph for these weights, T and V, exported once into the cache."""
    from .compiled import cache_dir, export_onnx

    cfg = generator.cfg
    t, v = steps or cfg.num_steps, votes or cfg.votes
    tag = weights_sha256[:16] or "unhashed"
    path = cache_dir() / "onnx" / f"{cfg.name}-{tag}-T{t}-V{v}-S{cfg.image_size}.onnx"
    if not path.is_file() or not weights_sha256:
        export_onnx(generator, path, t, v, weights_sha256=weights_sha256)
    return path


def _compiled_sampler(generator: Generator, steps: int | None, votes: int | None, backend: str,
                      weights_sha256: str) -> torch.nn.Module:
    from .compiled import OnnxSampler, TensorRTSampler, _require_tensorrt, build_tensorrt_engine

    if backend == "tensorrt":
        _require_tensorrt()  # fail at start, before any export work
    path = cached_onnx(generator, steps, votes, weights_sha256)
    if backend == "onnx":
        return OnnxSampler(path, generator, weights_sha256)
    return TensorRTSampler(build_tensorrt_engine(path), path)
