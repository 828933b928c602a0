"""The GPU run kit's dry run (scripts/gpu_check.sh --dry-run): every step on the CPU at tiny sizes in an
environment that lacks what the lent GPU's image lacks, so the preflight, the carried-wheel install,
the CUDA-only skips, the step limits and the packing are proven before any device time is spent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from gpu_kit import CARRIED, IMAGE_LACKS, PARTS, crashed_test, repack_installed  # noqa: E402

MAX_FILES_BACK = 8  # what the device tool returns from $OUT


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("kit_out")
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    return out, proc


def _steps(out: Path) -> dict[str, dict]:
    with tarfile.open(out / "gpu_kit.tar.gz") as tar:
        state = json.load(tar.extractfile("gpu_kit/steps.json"))
    assert state["dry_run"] is True and state["device"] == "cpu"
    return {s["name"]: s for s in state["steps"]}


def test_dry_run_returns_few_files_with_every_step_in_one_archive(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = [p for p in out.rglob("*") if p.is_file() and p.parent == out]
    assert sorted(p.name for p in files) == ["gpu_kit.tar.gz", "summary.md"]
    assert len(files) <= MAX_FILES_BACK
    with tarfile.open(out / "gpu_kit.tar.gz") as tar:
        names = set(tar.getnames())
    for must in ("gpu_kit/tests.txt", "gpu_kit/sampler_shipped.md", "gpu_kit/segment.md", "gpu_kit/ops.md",
                 "gpu_kit/preflight.txt"):
        assert must in names, must
    assert "| tests | ok |" in proc.stdout  # the key tables are printed too


def test_preflight_sees_the_gap_and_the_carried_wheels_fill_it(dry_run):
    out, _ = dry_run
    steps = _steps(out)
    with tarfile.open(out / "gpu_kit.tar.gz") as tar:
        before = tar.extractfile("gpu_kit/imports_before.txt").read().decode()
        after = tar.extractfile("gpu_kit/preflight.txt").read().decode()
    assert steps["imports_before"]["status"] == "failed"  # shapely is required and hidden
    assert "| shapely | required | MISSING |" in before and "the GPU image lacks it" in before
    assert steps["wheels"]["status"] == "ok" and "shapely" in steps["wheels"]["note"]
    assert steps["preflight"]["status"] == "ok" and "required modules missing: none" in after
    shapely_row = next(line for line in after.splitlines() if line.startswith("| shapely |"))
    assert "cdal_gpu_kit_" in shapely_row  # imported from the wheel target, not the set-up's site-packages
    assert "| nibabel | optional | MISSING |" in after  # hidden and not carried: stays missing


def test_cuda_only_steps_are_skipped_with_a_reason_and_timeouts_do_not_end_the_run(dry_run):
    out, _ = dry_run
    steps = _steps(out)
    assert steps["build"]["status"] == "skipped" and "CUDA-only" in steps["build"]["note"]
    assert steps["registration"]["status"] == "ok"
    assert steps["error_path"]["status"] == "ok"  # an op's error raises instead of crashing (an H200 build did)
    assert steps["bench_compile"]["status"] == "timeout" and steps["bench_compile"]["rc"] is None
    assert steps["ops"]["status"] == "ok"  # ran after the timed-out step
    assert steps["tests"]["status"] == "ok"
    for name in ("segment_sample_ref", "segment_sample_fast", "segment_slide_fast", "segment_slide_ref"):
        assert steps[name]["status"] == "ok", name
    with tarfile.open(out / "gpu_kit.tar.gz") as tar:
        report = json.load(tar.extractfile("gpu_kit/segment.json"))
        bench = json.load(tar.extractfile("gpu_kit/sampler_shipped.json"))
    fast = {r["run"]: r for r in report}
    assert fast["sample_fast"]["dice_vs_ref"] > 0.95 and fast["sample_fast"]["dtype"] == "bfloat16"
    rows = {(r["batch"], r["variant"]): r for r in bench["rows"]}
    assert rows[(1, "original_protocol")]["ms_per_tile"] > 0
    assert "needs --device cuda" in rows[(1, "graphs_bf16")]["skipped"]
    assert rows[(2, "fused_bf16")]["dice_vs_fp32"] > 0.95


def test_repacked_wheel_installs_with_the_kit_pip_command(tmp_path):
    assert set(CARRIED) <= set(IMAGE_LACKS)
    wheel = repack_installed(CARRIED[0], tmp_path)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, timeout=120)
    assert (target / CARRIED[0] / "__init__.py").is_file()


def test_a_crashing_test_is_named_from_pytests_own_output(tmp_path):
    """A segfault kills pytest: the kit reads the dying test from faulthandler's traceback to deselect it
    and rerun the rest (seen on an H200: one crash had hidden every later GPU test)."""
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_boom.py").write_text("import faulthandler\n\n\ndef test_fine():\n    pass\n\n\n"
                                        "def test_boom():\n    faulthandler._sigsegv()\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_boom.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode < 0
    assert crashed_test(proc.stdout + proc.stderr) == "tests/test_boom.py::test_boom"
    assert crashed_test("1 passed in 0.1s") is None


def test_only_rejects_an_unknown_part(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/gpu_kit.py", str(tmp_path), "--dry-run", "--only", "tests,nope"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown part(s) nope" in proc.stderr
    assert list(PARTS)[0] == "tests"  # the most important part runs first
