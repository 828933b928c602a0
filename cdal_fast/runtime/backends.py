"""Sampler backends selectable from the CLI (``--backend``).

* ``eager``: the plain PyTorch modules.
* ``torchscript``: the same sampler through ``torch.jit.script`` (what the C++ export ships).
* ``fused``: eager with latent modulation and attention routed through the ``cdal`` custom ops.
* ``compile``: ``torch.compile`` of the sampler (useful on GPUs; compiles on first use).
* ``onnx``: the unrolled sampler as an ONNX graph run by onnxruntime (exported once, cached).
* ``onnx_int8``: that graph statically quantised to int8 (calibrated once, cached); CPUs with VNNI only.
* ``tensorrt``: a TensorRT engine built from that graph (cached; needs a GPU and TensorRT).
* ``graphs``: eager (fused ops when built) replayed as CUDA graphs per static input shape (GPU only).
* ``auto``: the fastest measured of these for the device and dtype (:mod:`cdal_fast.runtime.backend_choice`).

Backends that need something missing fail at start with one message saying what to install.

This module maps names to builders. Errors and requirement checks live in
:mod:`cdal_fast.runtime.requires`, the ONNX graph cache in :mod:`cdal_fast.runtime.onnx_cache`, the
exported samplers in :mod:`cdal_fast.runtime.onnx_tensorrt`, CUDA-graph replay in
:mod:`cdal_fast.runtime.graphs`. A builder never changes the generator it is given: fusion is a property of
the sampler it returns (a parameter-sharing copy routed through the custom ops, or not).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch

from ..network.generator import Generator
from ..sampling.one_pass import sampler_for
from ..sampling.sampler import SamplerLike
from .backend_choice import AUTO, preference, resolve_backend
from .cpu_features import cpu_features
from .graphs import GraphedSampler
from .onnx_cache import cached_onnx
from .onnx_quant import cached_int8_onnx
from .onnx_tensorrt import DEFAULT_TRT_BATCH, OnnxSampler, TensorRTSampler, build_tensorrt_engine, onnx_providers
from .requires import BackendError, require_cuda_device, require_ops, require_tensorrt

__all__ = ["AUTO", "BACKENDS", "BACKEND_CHOICES", "BackendError", "build_sampler", "require_ops", "GraphedSampler"]

# builders also take a keyword-only ``tta`` flag (test-time augmentation)
Builder = Callable[..., SamplerLike]
DEFAULT_MAX_BATCH = DEFAULT_TRT_BATCH  # tiles per call a fixed-shape backend is built for when not told
# --dtype -> TensorRT engine precision: the engine runs in the precision asked for (strongly typed)
TRT_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# backends whose generator is PyTorch modules, so fusion and memory layout are choices of the build
MODULE_BACKENDS = ("eager", "torchscript", "fused", "compile", "graphs")


def _sampler_generator(generator: Generator, fused: bool, device: torch.device, dtype: torch.dtype,
                       channels_last: bool = False) -> Generator:
    """The generator a built sampler runs: never the caller's object.

    When the weights are already on ``device`` in ``dtype`` the copy shares them (no memory cost);
    otherwise it is a full copy, so moving or casting it leaves the caller's model as it was. A
    channels-last sampler always gets a full copy: converting the layout rewrites the parameters in
    place, which would change the caller's model through shared ones.
    """
    p = next(generator.parameters())
    in_place = p.dtype == dtype and p.device.type == device.type and (
        device.index is None or p.device.index == device.index)
    if in_place and not channels_last:
        return generator.with_fused(fused)
    return copy.deepcopy(generator).set_fused(fused)


def _eager(generator: Generator, steps: int | None, votes: int | None, device: torch.device,
           dtype: torch.dtype, fused: bool = False, tta: bool = False, channels_last: bool = False) -> SamplerLike:
    gen = _sampler_generator(generator, fused, device, dtype, channels_last)
    sampler = sampler_for(gen, steps, votes, tta=tta).to(device=device, dtype=dtype).eval()
    if channels_last:  # convolutions then hand each other NHWC activations (the fused ops take both layouts)
        sampler.to(memory_format=torch.channels_last)
    return sampler


def _build_eager(generator: Generator, steps: int | None, votes: int | None, device: torch.device,
                 dtype: torch.dtype, weights_sha256: str, max_batch: int, *, tta: bool = False,
                 fused: bool | None = None, channels_last: bool = False) -> SamplerLike:
    return _eager(generator, steps, votes, device, dtype, fused=bool(fused), tta=tta, channels_last=channels_last)


def _build_torchscript(generator: Generator, steps: int | None, votes: int | None, device: torch.device,
                       dtype: torch.dtype, weights_sha256: str, max_batch: int, *, tta: bool = False,
                       fused: bool | None = None, channels_last: bool = False) -> SamplerLike:
    return torch.jit.script(_eager(generator, steps, votes, device, dtype, fused=bool(fused), tta=tta,
                                   channels_last=channels_last))


def _build_fused(generator: Generator, steps: int | None, votes: int | None, device: torch.device,
                 dtype: torch.dtype, weights_sha256: str, max_batch: int, *, tta: bool = False,
                 fused: bool | None = None, channels_last: bool = False) -> SamplerLike:
    if fused is False:
        raise BackendError("the fused backend always runs the fused ops; use --backend eager for plain ones")
    return _eager(generator, steps, votes, device, dtype, fused=True, tta=tta, channels_last=channels_last)


def _build_compile(generator: Generator, steps: int | None, votes: int | None, device: torch.device,
                   dtype: torch.dtype, weights_sha256: str, max_batch: int, *, tta: bool = False,
                   fused: bool | None = None, channels_last: bool = False) -> SamplerLike:
    return torch.compile(_eager(generator, steps, votes, device, dtype, fused=bool(fused), tta=tta,
                                channels_last=channels_last), dynamic=False)


def _build_graphs(generator: Generator, steps: int | None, votes: int | None, device: torch.device,
                  dtype: torch.dtype, weights_sha256: str, max_batch: int, *, tta: bool = False,
                  fused: bool | None = None, channels_last: bool = False) -> SamplerLike:
    """CUDA-graph replay; by default of the fused ops when the library is built (``set_fused`` keeps
    the plain ops otherwise), ``fused=False`` replays the plain ops (to compare the two)."""
    return GraphedSampler(_eager(generator, steps, votes, device, dtype, fused=fused is not False, tta=tta,
                                 channels_last=channels_last))


def _build_onnx(generator: Generator, steps: int | None, votes: int | None, device: torch.device,
                dtype: torch.dtype, weights_sha256: str, max_batch: int, *, tta: bool = False,
                fused: bool | None = None, channels_last: bool = False) -> SamplerLike:
    providers = onnx_providers(device)  # refuses a GPU this onnxruntime cannot run on, before any export
    return OnnxSampler(cached_onnx(generator, steps, votes, weights_sha256, tta=tta), generator, weights_sha256,
                       providers=providers)


def _build_onnx_int8(generator: Generator, steps: int | None, votes: int | None, device: torch.device,
                     dtype: torch.dtype, weights_sha256: str, max_batch: int, *, tta: bool = False,
                     fused: bool | None = None, channels_last: bool = False) -> SamplerLike:
    """Static int8 graph (:mod:`.onnx_quant`), on a CPU with VNNI only (elsewhere its masks drift)."""
    return OnnxSampler(cached_int8_onnx(generator, steps, votes, weights_sha256, tta=tta), generator,
                       weights_sha256)


def _build_tensorrt(generator: Generator, steps: int | None, votes: int | None, device: torch.device,
                    dtype: torch.dtype, weights_sha256: str, max_batch: int, *, tta: bool = False,
                    fused: bool | None = None, channels_last: bool = False) -> SamplerLike:
    precision = TRT_PRECISION[dtype]
    path = cached_onnx(generator, steps, votes, weights_sha256, precision, tta=tta)
    return TensorRTSampler(build_tensorrt_engine(path, precision, max_batch), path)


def _require_int8_cpu(device: torch.device) -> None:
    if device.type != "cpu":
        raise BackendError("the onnx_int8 backend runs on a CPU (--device cpu)")
    features = cpu_features()
    if not features.vnni:
        raise BackendError(f"the onnx_int8 backend needs a CPU with VNNI (AVX-512 VNNI, AVX-VNNI or AMX); this one "
                           f"has none ({features.describe()}): without it int8 convolutions saturate")


# What each backend needs, checked without building anything (no export, no model copy): before every
# build (explicit or a candidate of auto) and by the job at a run's start. The builders assume it passed.
PREFLIGHT: dict[str, Callable[[torch.device], object]] = {
    "fused": lambda device: require_ops(),
    "graphs": lambda device: require_cuda_device(device, "graphs", "CUDA graphs"),
    "onnx": onnx_providers,
    "onnx_int8": _require_int8_cpu,
    "tensorrt": lambda device: require_tensorrt(),
}


def check_backend(backend: str, device: torch.device | str) -> None:
    """Raise :class:`BackendError` now when ``backend`` cannot run on ``device`` here, so a run fails at
    its start with the reason instead of after its inputs were listed and read (``auto`` always runs)."""
    if backend != AUTO and backend not in BUILDERS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    _preflight(backend, torch.device(device))


def _preflight(backend: str, device: torch.device) -> None:
    check = PREFLIGHT.get(backend)
    if check is not None:
        check(device)


BUILDERS: dict[str, Builder] = {
    "eager": _build_eager,
    "torchscript": _build_torchscript,
    "fused": _build_fused,
    "compile": _build_compile,
    "onnx": _build_onnx,
    "onnx_int8": _build_onnx_int8,
    "tensorrt": _build_tensorrt,
    "graphs": _build_graphs,
}
BACKENDS = tuple(BUILDERS)
BACKEND_CHOICES = (AUTO, *BACKENDS)  # what --backend accepts: auto resolves to one of BACKENDS


def build_sampler(generator: Generator, steps: int | None, votes: int | None, backend: str = "eager",
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  weights_sha256: str = "", max_batch: int = DEFAULT_MAX_BATCH, tta: bool = False,
                  fused: bool | None = None, channels_last: bool = False) -> SamplerLike:
    """The sampler of ``backend`` for ``generator`` (which is left unchanged).

    ``auto`` (``segment``'s default) is the fastest measured backend for ``device`` and ``dtype`` whose pieces
    are installed (:mod:`cdal_fast.runtime.backend_choice`), falling back along the measured order.

    ``tta`` turns on test-time augmentation (:mod:`cdal_fast.sampling.dihedral`); every backend supports it
    (the ONNX graph and TensorRT engine are exported with it and cached under their own name).

    ``max_batch`` is the most tiles one call will hold; backends with fixed shapes (TensorRT's
    optimisation profile) are built for 1..``max_batch``.

    ``fused`` (None: the backend's own choice) and ``channels_last`` only apply to the backends that
    run PyTorch modules (:data:`MODULE_BACKENDS`); the benchmarks use them to compare variants.
    """
    dev = torch.device(device)
    if backend == AUTO:
        return _build_auto(generator, steps, votes, dev, dtype, weights_sha256, max_batch, tta=tta)
    if backend not in BUILDERS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    if (fused is not None or channels_last) and backend not in MODULE_BACKENDS:
        raise BackendError(f"--backend {backend} runs a compiled graph: fusion and memory layout are not options "
                           f"of it (they are of {', '.join(MODULE_BACKENDS)})")
    _preflight(backend, dev)  # before any export or model copy
    return BUILDERS[backend](generator, steps, votes, dev, dtype, weights_sha256, max_batch, tta=tta, fused=fused,
                             channels_last=channels_last)


def _build_auto(generator: Generator, steps: int | None, votes: int | None, device: torch.device,
                dtype: torch.dtype, weights_sha256: str, max_batch: int, *, tta: bool = False) -> SamplerLike:
    """The resolver's choice; when building it still fails (e.g. the ONNX export), the next candidate.

    The candidates come from :func:`cdal_fast.runtime.backend_choice.resolve_backend`'s measured order, so a
    failure costs speed, never the run; ``eager`` needs nothing and ends every chain.
    """
    order, _ = preference(device, dtype, generator.cfg)
    start = order.index(resolve_backend(device, dtype, generator.cfg).backend)
    errors = []
    for name in dict.fromkeys((*order[start:], "eager")):
        try:
            _preflight(name, device)
            return BUILDERS[name](generator, steps, votes, device, dtype, weights_sha256, max_batch, tta=tta)
        except BackendError as exc:
            errors.append(f"{name}: {exc}")
            warnings.warn(f"--backend auto: {name} could not be built ({exc}); trying the next one", stacklevel=2)
    raise BackendError("--backend auto: no backend could be built (" + "; ".join(errors) + ")")
