"""TensorRT decisions as plain Python: supported versions, network typing, profiles, return checks.

Kept apart from the code that drives TensorRT (:mod:`cdal_fast.runtime.onnx_tensorrt`) so that every decision
can be tested on machines without TensorRT or a GPU. Functions that need TensorRT's enums take the
``tensorrt`` module (or any object with the same attribute names) as ``trt``.

Precision: TensorRT 11 removed weak typing (``BuilderFlag.FP16`` / ``BF16`` no longer exist) and
every network is strongly typed: each layer runs in the type its ONNX graph gives it. So on both
supported majors the engine is built as a strongly typed network from an ONNX graph exported in the
requested precision (float32 inputs/outputs and float32 group-norm statistics, see
:mod:`cdal_fast.runtime.onnx_groupnorm`); TensorRT 10 needs the ``STRONGLY_TYPED`` creation flag for that,
TensorRT 11 ignores or lacks it.
"""

from __future__ import annotations

from typing import Any

import torch

from .requires import BackendError

__all__ = ["SUPPORTED_TRT_MAJORS", "PRECISIONS", "trt_major", "network_flags", "profile_shapes",
           "check_input_shape", "check_call", "torch_dtype"]

SUPPORTED_TRT_MAJORS = (10, 11)
PRECISIONS = ("fp16", "bf16", "fp32")
MIN_PROFILE_BATCH = 1  # the tail batch of a slide may hold a single tile
# input name -> (batch axis, rows per tile): x_init, z and post hold V rows per tile (vote-major)
_BATCH_AXES = {"image": (0, False), "x_init": (0, True), "z": (1, True), "post": (1, True)}
_TRT_TO_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8, "INT8": torch.int8}


def trt_major(version: str) -> int:
    """The major version of ``tensorrt.__version__``, or a BackendError naming the supported ones."""
    supported = " and ".join(f"{m}.x" for m in SUPPORTED_TRT_MAJORS)
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise BackendError(f"cannot read TensorRT's version {version!r}; cdal-fast supports TensorRT {supported}") \
            from None
    if major not in SUPPORTED_TRT_MAJORS:
        raise BackendError(f"TensorRT {version} is not supported; cdal-fast supports TensorRT {supported} "
                           "(pip install 'tensorrt>=10,<12')")
    return major


def network_flags(trt: Any) -> int:
    """``create_network`` flags for a strongly typed network on this TensorRT version."""
    major = trt_major(trt.__version__)
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    if flag is None:
        if major < 11:  # 10.x must opt in; a 10.x without the flag cannot honour the graph's types
            raise BackendError(f"TensorRT {trt.__version__} lacks NetworkDefinitionCreationFlag.STRONGLY_TYPED")
        return 0  # 11.x: every network is strongly typed
    return 1 << int(flag)


def profile_shapes(name: str, shape: tuple[int, ...], votes: int, max_batch: int
                   ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes of one sampler input for batches of 1..``max_batch`` tiles.

    ``shape`` is the network input's shape (its batch axis dynamic, -1); the optimum is the
    requested batch, which is what every batch but a slide's last one holds.
    """
    if name not in _BATCH_AXES:
        raise BackendError(f"unexpected TensorRT network input {name!r}; expected {', '.join(_BATCH_AXES)}")
    if max_batch < MIN_PROFILE_BATCH:
        raise BackendError(f"TensorRT profile batch must be >= {MIN_PROFILE_BATCH}, got {max_batch}")
    axis, per_vote = _BATCH_AXES[name]
    rows = votes if per_vote else 1

    def at(batch: int) -> tuple[int, ...]:
        s = list(shape)
        s[axis] = rows * batch
        return tuple(int(d) for d in s)

    return at(MIN_PROFILE_BATCH), at(max_batch), at(max_batch)


def check_input_shape(ok: bool, name: str, shape: tuple[int, ...],
                      profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]) -> None:
    """Raise when ``set_input_shape`` refused ``shape``, naming the engine's allowed range."""
    if ok:
        return
    lo, _, hi = (tuple(int(d) for d in s) for s in profile)
    raise BackendError(f"TensorRT engine input {name!r}: shape {tuple(shape)} is outside the engine's optimisation "
                       f"profile, which allows {lo} to {hi}; use a batch size within the one the engine was built "
                       "for (--batch-size / export --batch) and the tile size it was exported for")


def check_call(ok: bool, what: str) -> None:
    """Raise a BackendError when a TensorRT call that reports failure by returning False did so."""
    if not ok:
        raise BackendError(f"TensorRT {what} failed")


def torch_dtype(trt: Any, trt_type: Any) -> torch.dtype:
    """The torch dtype of a ``trt.DataType`` value (engine inputs/outputs are typed by the engine)."""
    for name, dtype in _TRT_TO_TORCH.items():
        if getattr(trt.DataType, name, None) == trt_type:
            return dtype
    raise BackendError(f"TensorRT tensor type {trt_type} has no torch equivalent here")
