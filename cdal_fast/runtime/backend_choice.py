"""``--backend auto``: the fastest measured sampler backend for a device and dtype, with fallbacks.

The preference lists are measurements, not guesses: ``bench/cpu_tile.py`` times every CPU path in
one process against the original implementation's protocol (``bench/results/cpu_tile.md``), and
``bench/sampler_backends.py`` does the same on GPUs. Each list is ordered fastest first; the
resolver walks it and takes the first backend whose pieces are present, so a machine without
onnxruntime, or without the C++ op library, still gets the best of what it has and ``cdal-fast
info`` can say what was passed over and why.

* CPU, float32: ``onnx`` (the unrolled sampler graph in onnxruntime with the tuned session of
  :mod:`cdal_fast.runtime.ort_options`), then ``eager``. The fused C++ ops are not on the list: on CPU at
  256x256 they measured no faster than eager.
* CPU, bfloat16 / float16: ``eager`` (the ONNX graph is float32; asking for a reduced precision is
  taken as a request to run the PyTorch modules in it).
* CPU, float32, a model whose config records ``cpu_int8`` (its int8 sampler graph met the mask
  agreement rule, Dice >= 0.99 against float32 on the same noise on real tiles) on a CPU with VNNI:
  ``onnx_int8`` first (:mod:`.onnx_quant`), then the float32 order. Without VNNI, or for any other
  model, float32 stays.
* CUDA: ``graphs`` (CUDA-graph replay of the sampler, fused ops when built), then ``eager``. On an
  H200 (``bench/results/gpu_h200/sampler_shipped.md``, shipped model, batch 8) graphs ran 22.4 ms per
  tile in float32 against eager's 28.1 (masks identical) and 18.1 in bfloat16 (20.2 with TTA, against
  eager float32's 30.2). ``compile`` was faster still (13.3 ms in bfloat16) but its first call took
  103 s, so it stays a choice for long runs, not the default.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..network.config import ModelConfig
from .cpu_features import cpu_features

__all__ = ["AUTO", "BackendChoice", "preference", "missing_piece", "resolve_backend"]

AUTO = "auto"
CPU_FLOAT32_ORDER = ("onnx", "eager")
CPU_INT8_ORDER = ("onnx_int8", *CPU_FLOAT32_ORDER)
CPU_REDUCED_ORDER = ("eager",)
CUDA_ORDER = ("graphs", "eager")
MEASURED_IN = "bench/results/cpu_tile.md"
GPU_MEASURED_IN = "bench/results/gpu_h200/sampler_shipped.md"


@dataclass(frozen=True)
class BackendChoice:
    """What ``auto`` resolved to, why, and the faster candidates that were passed over (with why)."""

    backend: str
    reason: str
    passed_over: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def describe(self) -> str:
        """One line for ``cdal-fast info`` and the run summary."""
        text = f"{self.backend} ({self.reason})"
        if self.passed_over:
            text += "; passed over: " + "; ".join(f"{name}: {why}" for name, why in self.passed_over)
        return text


def preference(device: torch.device, dtype: torch.dtype, cfg: ModelConfig | None = None
               ) -> tuple[tuple[str, ...], str]:
    """The candidate backends for ``device``, ``dtype`` and the model ``cfg``, fastest first, and where
    that order comes from."""
    if device.type == "cuda":
        return CUDA_ORDER, f"fastest GPU path without a long first compile, measured in {GPU_MEASURED_IN}"
    if dtype == torch.float32:
        if cfg is not None and cfg.cpu_int8 and cpu_features().vnni:
            return CPU_INT8_ORDER, (f"this CPU has VNNI and {cfg.name}'s int8 graph met the mask agreement rule "
                                    f"(its config's cpu_int8; measured in {MEASURED_IN})")
        return CPU_FLOAT32_ORDER, f"fastest float32 CPU path measured in {MEASURED_IN}"
    name = str(dtype).removeprefix("torch.")
    return CPU_REDUCED_ORDER, f"{name} on CPU runs the PyTorch modules (the ONNX graph is float32)"


def _module_missing(*modules: str) -> str | None:
    for name in modules:
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed (pip install {name})"
    return None


def _ops_missing() -> str | None:
    from ..network import ops

    status = ops.extension_status()
    return None if status.loaded else f"the C++ op library is not available ({status.reason})"


# backend -> a check returning None when everything it needs is importable, else what is missing
PIECES: dict[str, Callable[[], str | None]] = {
    "onnx": lambda: _module_missing("onnxruntime", "onnx"),
    "onnx_int8": lambda: _module_missing("onnxruntime", "onnx") or (
        None if cpu_features().vnni else "this CPU has no VNNI (int8 convolutions would saturate)"),
    "fused": _ops_missing,
    "eager": lambda: None,
}


def missing_piece(backend: str) -> str | None:
    """What ``backend`` lacks on this installation (None when it can be built)."""
    check = PIECES.get(backend)
    return check() if check is not None else None


def resolve_backend(device: torch.device | str, dtype: torch.dtype = torch.float32,
                    cfg: ModelConfig | None = None) -> BackendChoice:
    """The backend ``auto`` means for ``device``, ``dtype`` and the model ``cfg`` here, from the measured
    preference order."""
    dev = torch.device(device)
    order, why = preference(dev, dtype, cfg)
    passed: list[tuple[str, str]] = []
    for name in order:
        missing = missing_piece(name)
        if missing is None:
            reason = why if not passed else f"{why}; the first candidate whose pieces are present"
            return BackendChoice(name, reason, tuple(passed))
        passed.append((name, missing))
    return BackendChoice("eager", "nothing else available", tuple(passed))
