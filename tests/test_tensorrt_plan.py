"""TensorRT decisions without TensorRT: versions, network typing, profiles, return-value errors.

``fake_trt`` is a stand-in for the few attributes of the absent ``tensorrt`` module these
functions read (its version string and two enums), not a mock of cdal-fast code.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cdal_fast.runtime.requires import BackendError
from cdal_fast.runtime.tensorrt_plan import (
    check_call,
    check_input_shape,
    network_flags,
    profile_shapes,
    torch_dtype,
    trt_major,
)

STRONGLY_TYPED_BIT = 1  # TensorRT 10's NetworkDefinitionCreationFlag.STRONGLY_TYPED


def fake_trt(version: str, strongly_typed: bool = True) -> SimpleNamespace:
    flags = SimpleNamespace(STRONGLY_TYPED=STRONGLY_TYPED_BIT) if strongly_typed else SimpleNamespace()
    return SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=flags,
                           DataType=SimpleNamespace(FLOAT=0, HALF=1, BF16=7, INT32=3))


@pytest.mark.parametrize("version, flags", [("10.3.0", 2), ("10.13.1.4", 2), ("11.0.0", 2)])
def test_strongly_typed_network_on_supported_versions(version, flags):
    assert network_flags(fake_trt(version)) == flags


def test_tensorrt_11_without_the_flag_is_strongly_typed_anyway_but_10_is_refused():
    assert network_flags(fake_trt("11.2.0", strongly_typed=False)) == 0
    with pytest.raises(BackendError, match="10.2.0 lacks NetworkDefinitionCreationFlag.STRONGLY_TYPED"):
        network_flags(fake_trt("10.2.0", strongly_typed=False))


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0", "12.0.0"])
def test_unsupported_versions_name_the_supported_ones(version):
    with pytest.raises(BackendError, match=rf"TensorRT {version} is not supported; .*10\.x and 11\.x"):
        trt_major(version)
    with pytest.raises(BackendError, match="cannot read TensorRT's version 'dev'"):
        trt_major("dev")


def test_profile_follows_the_requested_batch_and_vote_major_rows():
    votes = 5
    assert profile_shapes("image", (-1, 3, 256, 256), votes, 32) == ((1, 3, 256, 256), (32, 3, 256, 256),
                                                                     (32, 3, 256, 256))
    assert profile_shapes("x_init", (-1, 1, 256, 256), votes, 32)[2] == (160, 1, 256, 256)
    assert profile_shapes("z", (4, -1, 100), votes, 32) == ((4, 5, 100), (4, 160, 100), (4, 160, 100))
    assert profile_shapes("post", (4, -1, 1, 256, 256), votes, 3)[0] == (4, 5, 1, 256, 256)
    with pytest.raises(BackendError, match="unexpected TensorRT network input 'noise'"):
        profile_shapes("noise", (-1, 3), votes, 4)
    with pytest.raises(BackendError, match="batch must be >= 1, got 0"):
        profile_shapes("image", (-1, 3, 8, 8), votes, 0)


def test_refused_input_shape_reports_the_allowed_range():
    profile = profile_shapes("image", (-1, 3, 256, 256), 5, 16)
    check_input_shape(True, "image", (16, 3, 256, 256), profile)
    with pytest.raises(BackendError, match=r"'image': shape \(17, 3, 256, 256\) is outside .* allows "
                                           r"\(1, 3, 256, 256\) to \(16, 3, 256, 256\)"):
        check_input_shape(False, "image", (17, 3, 256, 256), profile)
    with pytest.raises(BackendError, match=r"TensorRT set_tensor_address\('prob'\) failed"):
        check_call(False, "set_tensor_address('prob')")


def test_engine_types_map_to_torch_and_unknown_ones_are_named():
    trt = fake_trt("10.8.0")
    assert torch_dtype(trt, 1) is torch.float16 and torch_dtype(trt, 7) is torch.bfloat16
    assert torch_dtype(trt, 0) is torch.float32
    with pytest.raises(BackendError, match="tensor type 42 has no torch equivalent"):
        torch_dtype(trt, 42)
