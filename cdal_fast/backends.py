"""Sampler backends selectable from the CLI (``--backend``).

* ``eager``: the plain PyTorch modules.
* ``torchscript``: the same sampler through ``torch.jit.script`` (what the C++ export ships).
* ``fused``: eager with latent modulation and attention routed through the ``cdal`` custom ops.
* ``compile``: ``torch.compile`` of the sampler (useful on GPUs; compiles on first use).
* ``onnx``: the unrolled sampler as an ONNX graph run by onnxruntime (exported once, cached).
* ``tensorrt``: a TensorRT engine built from that graph (cached; needs a GPU and TensorRT).
* ``graphs``: eager (fused ops when built) replayed as CUDA graphs per static input shape (GPU only).

Backends that need something missing fail at start with one message saying what to install.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import ops
from .generator import Generator
from .sampler import FixedStepSampler

__all__ = ["BACKENDS", "BackendError", "build_sampler", "require_ops"]

BACKENDS = ("eager", "torchscript", "fused", "compile", "onnx", "tensorrt", "graphs")


class BackendError(RuntimeError):
    """The requested backend cannot run here."""


def require_ops() -> None:
    """Fail with the build instruction when the ``cdal`` C++ op library is not built."""
    if not ops.extension_available():
        raise BackendError("the fused ops need the C++ op library: run `bash scripts/setup.sh` "
                           "(or `pip install --no-build-isolation -e .`) to build it")


def build_sampler(generator: Generator, steps: int | None, votes: int | None, backend: str = "eager",
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  weights_sha256: str = "") -> torch.nn.Module:
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend in ("onnx", "tensorrt"):
        return _compiled_sampler(generator, steps, votes, backend, weights_sha256)
    if backend == "graphs" and torch.device(device).type != "cuda":
        raise BackendError("backend 'graphs' (CUDA graphs) needs --device cuda")
    if backend == "fused":
        require_ops()
    # graphs uses the custom ops when the library is built; set_fused keeps plain ops otherwise
    generator.set_fused(backend in ("fused", "graphs"))
    sampler = FixedStepSampler(generator, steps, votes).to(device=device, dtype=dtype).eval()
    if backend == "torchscript":
        return torch.jit.script(sampler)
    if backend == "compile":
        return torch.compile(sampler, dynamic=False)
    if backend == "graphs":
        return GraphedSampler(sampler)
    return sampler


_SAFE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_MAX_NAME_CHARS = 40  # of the preset name kept in a cache file name (the hash is the real key)
_HASH_TAG_CHARS = 32  # hex digits of the verified hash in the file name (128 bits)


def _safe_name(name: str) -> str:
    """``name`` reduced to letters, digits, ``_`` and ``-``: the preset name comes from an untrusted
    JSON, and ``../../x`` or ``a/b`` must not leave (or restructure) the cache folder."""
    cleaned = "".join(c if c in _SAFE_NAME_CHARS else "_" for c in name)[:_MAX_NAME_CHARS].strip("_")
    return cleaned or "model"


def _verified_tag(weights_sha256: str) -> str:
    """The cache key for a verified weights hash; "" when the value is not a SHA-256 at all."""
    digest = weights_sha256.lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        return ""
    return digest[:_HASH_TAG_CHARS]


def cached_onnx(generator: Generator, steps: int | None, votes: int | None, weights_sha256: str) -> Path:
    """The sampler's ONNX graph for these weights, T and V, exported once into the cache.

    ``weights_sha256`` must be the hash ``load_weights`` verified (``ModelBundle.content_sha256``);
    only then is a cached graph reused. Without one (unverified weights, a bare generator) the
    graph is exported afresh into a file private to this process and never read from the cache.
    The file name holds nothing but a sanitised preset name, the hash, T, V and the tile size.
    """
    from .compiled import cache_dir, export_onnx

    cfg = generator.cfg
    t, v = steps or cfg.num_steps, votes or cfg.votes
    tag = _verified_tag(weights_sha256)
    folder = cache_dir() / "onnx"
    shape = f"T{int(t)}-V{int(v)}-S{int(cfg.image_size)}"
    if tag:
        path = folder / f"{_safe_name(cfg.name)}-{tag}-{shape}.onnx"
    else:
        path = folder / "unverified" / f"{_safe_name(cfg.name)}-pid{os.getpid()}-{shape}.onnx"
    if path.resolve().parent != (folder / ("" if tag else "unverified")).resolve():
        raise BackendError(f"ONNX cache file {path} would lie outside the cache folder {folder}")
    if not tag or not path.is_file():
        export_onnx(generator, path, t, v, weights_sha256=weights_sha256 if tag else "")
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


class GraphedSampler(torch.nn.Module):
    """Replays the whole T-step sampler as one CUDA graph per input shape (static shapes only).

    Inputs are copied into static buffers, the captured graph is replayed and the outputs are
    cloned, which removes the per-kernel launch overhead that dominates small batches.
    """

    def __init__(self, sampler: torch.nn.Module) -> None:
        super().__init__()
        self.sampler = sampler
        self.num_steps, self.votes = sampler.num_steps, sampler.votes
        self.mask_channels, self.nz = sampler.mask_channels, sampler.nz
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple[torch.Tensor, ...]]] = {}

    def forward(self, image: torch.Tensor, x_init: torch.Tensor, z: torch.Tensor,
                post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = [t.to(image.device, image.dtype) for t in (image, x_init, z, post)]
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        if key not in self._graphs:
            static = [t.clone() for t in inputs]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(2):  # warm-up: cuDNN autotuning and allocator
                    self.sampler(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode():
                outputs = self.sampler(*static)
            self._graphs[key] = (graph, static, outputs)
        graph, static, outputs = self._graphs[key]
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        graph.replay()
        return tuple(o.clone() for o in outputs)
