"""Export ``aten::group_norm`` as ONNX ``GroupNormalization`` computed in float32.

PyTorch's TorchScript-based ONNX exporter writes group norm at every opset as Reshape +
``InstanceNormalization`` + Reshape. TensorRT runs that pattern in the network's reduced precision,
so an fp16 engine would accumulate the statistics of a 256x256 map in half precision. The standard
``GroupNormalization`` op (opset 18) is imported by TensorRT as one normalisation layer; here it is
always fed float32 (a ``Cast`` before, a ``CastLike`` back after), so the statistics stay in float32
even in a strongly typed fp16/bf16 graph, which is what eager PyTorch does too.

Opset 18's ``GroupNormalization`` takes a scale and bias per *group* (opset 21 changed that to per
channel), so the op gets unit scale and zero bias and the per-channel affine follows as Mul / Add;
the graph means the same at opset 18 and every later opset.

:func:`group_normalization_export` registers the symbolic only for the duration of one export, so
importing this package never changes how anyone else's models export.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.onnx import symbolic_helper

__all__ = ["GROUP_NORM_OPSET", "group_normalization_export"]

GROUP_NORM_OPSET = 18  # first opset with the standard GroupNormalization op
_ATEN_NAME = "aten::group_norm"
_ONNX_FLOAT = 1  # TensorProto.FLOAT
GraphContext = Any  # the exporter's graph context (a private torch.onnx type)


def _channel_view(g: GraphContext, per_channel: object, rank: int) -> object:
    """A (C,) tensor unsqueezed to (C, 1, ...) so it broadcasts over an (N, C, spatial...) input."""
    axes = g.op("Constant", value_t=torch.arange(1, rank - 1, dtype=torch.int64))
    return g.op("Unsqueeze", per_channel, axes)


@symbolic_helper.parse_args("v", "i", "v", "v", "f", "i")
def _group_norm_symbolic(g: GraphContext, x: object, num_groups: int,
                         weight: object, bias: object, eps: float, cudnn_enabled: int) -> object:
    """GroupNormalization on a float32 copy of ``x``, cast back, then the channel affine."""
    rank = symbolic_helper._get_tensor_rank(x)
    if rank is None or rank < 3:
        raise ValueError(f"group_norm ONNX export needs an input of known rank >= 3 (N, C, ...), got rank {rank}")
    ones = g.op("Constant", value_t=torch.ones(num_groups, dtype=torch.float32))
    zeros = g.op("Constant", value_t=torch.zeros(num_groups, dtype=torch.float32))
    x32 = g.op("Cast", x, to_i=_ONNX_FLOAT)
    y = g.op("GroupNormalization", x32, ones, zeros, epsilon_f=eps, num_groups_i=num_groups)
    y = g.op("CastLike", y, x)
    if not symbolic_helper._is_none(weight):
        y = g.op("Mul", y, _channel_view(g, weight, rank))
    if not symbolic_helper._is_none(bias):
        y = g.op("Add", y, _channel_view(g, bias, rank))
    return y


@contextmanager
def group_normalization_export(opset: int) -> Iterator[None]:
    """Within the block, ``torch.onnx.export(..., opset_version=opset, dynamo=False)`` writes group
    norms as float32 ``GroupNormalization``; ``opset`` must be at least :data:`GROUP_NORM_OPSET`."""
    if opset < GROUP_NORM_OPSET:
        raise ValueError(f"GroupNormalization needs ONNX opset >= {GROUP_NORM_OPSET}, got {opset}")
    torch.onnx.register_custom_op_symbolic(_ATEN_NAME, _group_norm_symbolic, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic(_ATEN_NAME, opset)
