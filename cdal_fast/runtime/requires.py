"""Backend errors and the checks that say what a backend needs before any work starts.

A module of its own so that the builders (:mod:`cdal_fast.runtime.backends`), the compiled samplers
(:mod:`cdal_fast.runtime.onnx_tensorrt`) and the CLI can all raise and check without importing each other.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..network import ops

__all__ = ["BackendError", "require_ops", "require_tensorrt", "require_cuda_device"]


class BackendError(RuntimeError):
    """The requested backend cannot run here."""


def require_ops() -> None:
    """Fail with the build instruction when the ``cdal`` C++ op library is not built."""
    status = ops.extension_status()
    if not status.loaded:
        raise BackendError(f"the fused ops need the C++ op library, which is not available: {status.reason} "
                           "(docs/install.md, 'The C++ ops')")


def require_cuda_device(device: torch.device | str, backend: str, what: str) -> None:
    """Fail unless ``device`` is a CUDA device (``what`` names the feature for the message)."""
    if torch.device(device).type != "cuda":
        raise BackendError(f"backend {backend!r} ({what}) needs --device cuda")


def require_tensorrt() -> ModuleType:
    """TensorRT's Python module, or a BackendError saying what is missing (GPU or package)."""
    if not torch.cuda.is_available():
        raise BackendError("the tensorrt backend needs an NVIDIA GPU with CUDA; none is visible to torch here")
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError("the tensorrt backend needs TensorRT's Python package: pip install tensorrt "
                           "(matching your CUDA version), then rerun") from None
    return trt
