"""The op loader's three outcomes (network/op_library.py): prebuilt library, compiled on first use, plain PyTorch.

The compile is real (torch.utils.cpp_extension with the machine's compiler and ninja) and runs in a
fresh process with a private cache folder, so it neither reuses nor leaves a library for the rest of
the suite; ``CDAL_FAST_JIT=always`` makes it skip the prebuilt library the set-up built. The
wheel test (tests/test_wheel.py) covers the same path from the sources shipped inside a wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cdal_fast.network import op_library as ops

# Runs in the child: the loader's verdict, then both ops against their plain references.
PARITY = """
import json, torch
from cdal_fast.network import ops
status = ops.extension_status()
out = {"kind": status.kind, "path": str(status.path), "reason": status.reason, "describe": status.describe()}
if status.loaded:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 6, generator=g)
    gamma, beta, bias = (torch.randn(2, 8, generator=g) for _ in range(3))
    fused = torch.ops.cdal.adagn_silu(x, gamma, beta, bias, 4, 1e-6)
    out["adagn_silu"] = float((fused - ops.adagn_silu_reference(x, gamma, beta, bias, 4, 1e-6)).abs().max())
    w = [torch.randn(8, generator=g), torch.randn(8, generator=g), torch.randn(24, 8, 1, 1, generator=g) * 0.2,
         torch.randn(24, generator=g), torch.randn(8, 8, 1, 1, generator=g) * 0.2, torch.randn(8, generator=g)]
    fused = torch.ops.cdal.self_attention(x, *w, 4, 1e-6)
    out["self_attention"] = float((fused - ops.self_attention_reference(x, *w, 4, 1e-6)).abs().max())
print("RESULT " + json.dumps(out))
"""
TOLERANCE = 1e-4  # float32, reductions in another order


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CDAL_FAST_NO_EXTENSION", "CDAL_FAST_JIT", "CXX")}
    env["CDAL_FAST_CACHE"] = str(tmp_path / "cache")
    env.update(extra)
    return env


def _child(tmp_path: Path, **extra: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", PARITY], env=_env(tmp_path, **extra), capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT ")), proc.stderr


def _info(tmp_path: Path, **extra: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "cdal_fast.cli", "info"], env=_env(tmp_path, **extra),
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next(x for x in proc.stdout.splitlines() if x.startswith("C++ ops"))


def test_build_record_of_another_torch_is_a_mismatch():
    running = {"torch": "2.13.0+cpu", "cuda": None, "cxx11_abi": True}
    assert ops.torch_mismatch(dict(running), running) is None
    assert ops.torch_mismatch({**running, "torch": "2.5.1"}, running) == (
        "the prebuilt library was built for torch 2.5.1, this is torch 2.13.0+cpu")
    assert "CUDA 12.4" in ops.torch_mismatch({**running, "cuda": "12.4"}, running)
    assert "C++11 ABI" in ops.torch_mismatch({**running, "cxx11_abi": False}, running)
    assert set(ops.running_torch()) == set(running)


@pytest.mark.slow
def test_compiles_on_first_use_then_loads_from_the_cache(tmp_path):
    if shutil.which(os.environ.get("CXX") or "c++") is None:
        pytest.skip("no C++ compiler here (the set-up builds the ops with one)")
    first, stderr = _child(tmp_path, CDAL_FAST_JIT="always")
    assert first["kind"] == ops.COMPILED, first
    library = Path(first["path"])
    assert library.is_file() and (tmp_path / "cache" / "ops") in library.parents
    assert "compiling the C++ ops" in stderr
    assert first["adagn_silu"] < TOLERANCE and first["self_attention"] < TOLERANCE, first
    again, stderr = _child(tmp_path, CDAL_FAST_JIT="always")
    assert again["kind"] == ops.COMPILED and again["path"] == first["path"]
    assert "loaded from an earlier compile" in again["reason"] and "compiling" not in stderr
    assert again["adagn_silu"] < TOLERANCE
    line = _info(tmp_path, CDAL_FAST_JIT="always")
    assert line.startswith(f"C++ ops (torch.ops.cdal): compiled on first use at {library} "), line


def test_without_a_compiler_the_plain_path_says_why(tmp_path):
    missing = str(tmp_path / "no-such-compiler")
    result, stderr = _child(tmp_path, CDAL_FAST_JIT="always", CXX=missing)
    assert result["kind"] == ops.PLAIN and "adagn_silu" not in result
    assert f"{missing!r} not found" in result["reason"]
    assert "fall back to plain PyTorch" in stderr  # the one warning
    line = _info(tmp_path, CDAL_FAST_JIT="always", CXX=missing)
    assert line.startswith("C++ ops (torch.ops.cdal): plain PyTorch because CDAL_FAST_JIT=always skips the prebuilt "
                           "library, and there is no C++ compiler"), line
    assert not (tmp_path / "cache" / "ops").exists()  # nothing half-built left behind


def test_switches_say_why_nothing_was_loaded(tmp_path):
    assert _info(tmp_path, CDAL_FAST_NO_EXTENSION="1") == (
        "C++ ops (torch.ops.cdal): plain PyTorch because CDAL_FAST_NO_EXTENSION is set")
    line = _info(tmp_path, CDAL_FAST_JIT="bogus")
    assert line.endswith("CDAL_FAST_JIT='bogus' is not one of auto, never, always"), line
    line = _info(tmp_path, CDAL_FAST_JIT="never")
    assert "compiling on first use is off (CDAL_FAST_JIT=never)" in line or "prebuilt library loaded" in line, line
