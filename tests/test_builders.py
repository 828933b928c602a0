"""Sampler builders leave the caller's generator as it was; flag combinations that cannot be honoured are refused."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from cdal_fast import ops
from cdal_fast.backends import build_sampler
from cdal_fast.cli import main
from cdal_fast.config import get_preset
from cdal_fast.generator import Generator
from cdal_fast.layers import AdaGNSiLU


def _fused_flags(g: Generator) -> set[bool]:
    return {m.fused for m in g.modules() if isinstance(m, AdaGNSiLU)}


@pytest.mark.skipif(not ops.extension_available(), reason="C++ extension not built")
def test_fused_backend_does_not_change_the_callers_generator():
    g = Generator(get_preset("tiny")).eval()
    s = build_sampler(g, 1, 1, "fused")
    assert _fused_flags(g) == {False} and _fused_flags(s.generator) == {True}
    # the copy shares the weights: no parameter memory is duplicated
    assert next(s.generator.parameters()) is next(g.parameters())
    g.set_fused(True)  # and a later change of the caller's model does not reach the built sampler
    plain = build_sampler(g, 1, 1, "eager")
    assert _fused_flags(plain.generator) == {False} and _fused_flags(g) == {True}


def test_casting_builder_leaves_the_callers_weights_in_float32():
    g = Generator(get_preset("tiny")).eval()
    s = build_sampler(g, 1, 1, "eager", dtype=torch.bfloat16)
    assert next(g.parameters()).dtype == torch.float32
    assert next(s.generator.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["onnx", "tensorrt"])
def test_export_refuses_fused_for_plain_op_graphs(tmp_path, fmt):
    res = CliRunner().invoke(main, ["export", "--format", fmt, "--fused", "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code != 0 and f"--fused cannot be honoured by --format {fmt}" in res.output
    assert not list(tmp_path.iterdir())
