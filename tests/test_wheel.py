"""The wheel a user installs: built from a copy of the checkout, installed into a fresh virtual
environment with the core dependencies only, and used from a folder outside the source tree.

How torch gets into that environment without a multi-GB download: the environment borrows the
torch of the running set-up and nothing else. A ``.pth`` file points at a folder holding links to
torch and to the distributions torch itself requires (its closure, read from the installed
metadata); cdal-fast's own dependencies are not in that folder, so pip installs them, from the
package index or pip's cache, exactly as for a user who installed torch first (docs/install.md).
What pip installed is checked: no extra's package, no second torch, no CUDA libraries.

The checks, in order: the C++ ops load from the wheel's prebuilt library; every module imports and
each optional feature names its extra (tests/wheel_probe.py); `cdal-fast segment` writes the mask,
summary and nuclei of the bundled sample (with ``--votes 1``, a documented speed flag, to keep the
test near four minutes on two cores); and, with the build record edited to claim another torch,
the loader compiles the sources shipped in the wheel on first use and the compiled ops match the
plain references. A package index that cannot be reached skips the test with the reason.
"""

from __future__ import annotations

import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from cdal_fast.extras import install_hint

from .test_ops_loader import PARITY, TOLERANCE
from .test_packaging import FEATURE_EXTRAS, _name, distributions

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().parent / "wheel_probe.py"
# Not copied into the build: the set-up's environment and build outputs (the wheel builds its own).
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                    "_C_build.json", ".pytest_cache", ".ruff_cache", "masks", "runs", "out",
                                    ".whl", ".gpu")
# With a CPU torch the core install measured 1.34 GB (docs/install.md); a CUDA torch or the extras
# would take it far past this.
CPU_CORE_LIMIT_BYTES = 2_000_000_000
PIP_TIMEOUT_S = 900
RUN_TIMEOUT_S = 600
SAMPLE_OUTPUTS = ("sample_ihc.mask.ome.tif", "sample_ihc.json", "sample_ihc.nuclei.geojson", "sample_ihc.nuclei.csv")
CLAIMED_TORCH = "2.4.0"  # what the edited build record says the library was built for
CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # PyTorch's index of CPU-only wheels (README)
# pip's words for an index it cannot reach (name resolution, refused or dropped connections, time-outs)
UNREACHABLE = ("Errno", "NewConnectionError", "ConnectTimeout", "ReadTimeout", "Max retries exceeded",
               "Could not fetch URL", "ProxyError", "SSLError")


def _run(cmd: list[str], timeout: float = RUN_TIMEOUT_S, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def _torch_closure() -> list:
    """torch's distribution and those it requires, recursively (installed ones; extras' requirements left out)."""
    import importlib.metadata as md

    found, todo = {}, ["torch"]
    while todo:
        name = _name(todo.pop())
        if name in found:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:  # a requirement for another platform or Python
            continue
        found[name] = dist
        todo += [r for r in dist.requires or [] if not re.search(r"extra\s*==", r)]
    return list(found.values())


def _borrow_torch(folder: Path) -> int:
    """Links to torch's closure in ``folder``; returns the bytes those distributions take."""
    folder.mkdir()
    size = 0
    for dist in _torch_closure():
        site = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}:
            if not (folder / top).exists() and not top.endswith(".pth"):
                (folder / top).symlink_to(site / top)
        size += sum(p.stat().st_size for p in (Path(dist.locate_file(f)) for f in dist.files or []) if p.is_file())
    return size


def _tree_bytes(root: Path) -> int:
    return sum(f.lstat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())


def _ninja_dir() -> str:
    found = shutil.which("ninja") or shutil.which("ninja", path=str(Path(sys.executable).parent))
    return str(Path(found).parent) if found else ""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Wheel built and installed with the core only; returns paths, timings and sizes."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "CDAL_FAST_NO_EXTENSION", "CDAL_FAST_JIT", "VIRTUAL_ENV")}
    t0 = time.perf_counter()
    shutil.copytree(REPO, tmp / "src", ignore=NOT_COPIED, symlinks=True)
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist",
                  tmp / "src"], timeout=PIP_TIMEOUT_S, env=env)
    assert build.returncode == 0, build.stderr[-4000:]
    wheel = next((tmp / "dist").glob("cdal_fast-*.whl"))
    build_s = time.perf_counter() - t0

    venv = tmp / "venv"
    made = _run([sys.executable, "-m", "venv", venv], env=env)
    assert made.returncode == 0, made.stderr
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    torch_bytes = _borrow_torch(tmp / "borrowed")
    (site / "_borrowed_torch.pth").write_text(f"{tmp / 'borrowed'}\n")
    t0 = time.perf_counter()
    report = tmp / "install-report.json"
    pip = _run([py, "-m", "pip", "install", "-q", "--report", report, wheel], timeout=PIP_TIMEOUT_S, env=env)
    if pip.returncode != 0:
        reach = _run([py, "-m", "pip", "download", "-q", "--no-deps", "--no-cache-dir", "-d", tmp / "probe", "click"],
                     timeout=PIP_TIMEOUT_S, env=env)
        if reach.returncode != 0:
            pytest.skip(f"package index unreachable (pip download click: {reach.stderr.strip()[-300:]})")
    assert pip.returncode == 0, pip.stderr[-4000:]
    install_s = time.perf_counter() - t0
    outside = tmp / "outside"  # not under the checkout: nothing can come from the source tree
    outside.mkdir()
    run_env = {**env, "CDAL_FAST_CACHE": str(tmp / "cache"), "PATH": f"{venv / 'bin'}:{env.get('PATH', '')}"}
    info = {"wheel": wheel, "venv": venv, "py": py, "bin": venv / "bin", "site": site, "outside": outside,
            "env": run_env, "report": json.loads(report.read_text()), "build_s": build_s, "install_s": install_s,
            "venv_bytes": _tree_bytes(venv), "torch_bytes": torch_bytes, "tmp": tmp}
    yield info
    print(f"\nwheel test: build {build_s:.0f} s, install {install_s:.0f} s; core install "
          f"{(info['venv_bytes'] + torch_bytes) / 1e9:.2f} GB (venv {info['venv_bytes'] / 1e6:.0f} MB + torch and its "
          f"requirements {torch_bytes / 1e6:.0f} MB)" + "".join(f"; {k} {v}" for k, v in info.get("notes", {}).items()))


def test_wheel_carries_the_library_its_build_record_and_the_sources(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    assert any(re.fullmatch(r"cdal_fast/_C\..*\.so", n) for n in names), sorted(names)[:20]
    assert {"cdal_fast/_C_build.json", "cdal_fast/_csrc/register.cpp", "cdal_fast/_csrc/ops.h",
            "cdal_fast/_csrc/cpu/adagn_silu_cpu.cpp", "cdal_fast/samples/sample_ihc.ome.tif"} <= names
    record = json.loads(zipfile.ZipFile(installed["wheel"]).read("cdal_fast/_C_build.json"))
    assert record["torch"] == torch.__version__


def test_only_the_core_is_installed(installed):
    pip_list = _run([installed["py"], "-m", "pip", "list", "--format", "json"], env=installed["env"])
    present = {_name(p["name"]) for p in json.loads(pip_list.stdout)}
    added = {_name(i["metadata"]["name"]) for i in installed["report"]["install"]}
    extras_only = distributions((*FEATURE_EXTRAS, "dev")) - distributions()
    assert not present & extras_only, f"extras' packages in a core install: {present & extras_only}"
    assert "torch" not in added, "pip replaced the borrowed torch"
    assert not [n for n in added if n.startswith("nvidia-")], added
    assert distributions() - {"torch"} <= added | present, "a core dependency is missing"
    if torch.version.cuda is None:  # sizes of a CPU install (docs/install.md); a CUDA torch weighs GBs more
        assert installed["venv_bytes"] + installed["torch_bytes"] < CPU_CORE_LIMIT_BYTES


def test_info_from_outside_the_source_tree(installed):
    res = _run([installed["bin"] / "cdal-fast", "info"], cwd=installed["outside"], env=installed["env"])
    assert res.returncode == 0, res.stderr
    ops_line = next(x for x in res.stdout.splitlines() if x.startswith("C++ ops"))
    assert ops_line.startswith(f"C++ ops (torch.ops.cdal): prebuilt library loaded ({installed['site']}"), ops_line
    auto = next(x for x in res.stdout.splitlines() if x.startswith("--backend auto on cpu, float32"))
    assert auto.split(": ", 1)[1].startswith(("onnx ", "onnx_int8 ")), auto


def test_every_module_imports_and_features_name_their_extra(installed, tmp_path):
    import numpy as np
    import tifffile

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    tifffile.imwrite(inputs / "jpeg_tiles.ome.tif", pixels, compression="jpeg", tile=(256, 256), photometric="rgb")
    (inputs / "scan.ndpi").write_bytes(b"\0" * 100)
    (inputs / "dicom_slide").mkdir()
    (inputs / "dicom_slide" / "level0.dcm").write_bytes(b"\0" * 132)
    (inputs / "scan.nii.gz").write_bytes(b"\0" * 352)
    probe = shutil.copy(PROBE, installed["outside"] / PROBE.name)
    res = _run([installed["py"], probe, inputs, tmp_path / "out"], cwd=installed["outside"], env=installed["env"])
    assert res.returncode == 0, res.stderr[-4000:]
    result = json.loads(next(x for x in res.stdout.splitlines() if x.startswith("PROBE ")).removeprefix("PROBE "))
    assert Path(result["package"]).parent == installed["site"] / "cdal_fast"
    assert result["failed"] == {}
    import cdal_fast

    expected = {m.name for m in pkgutil.walk_packages(cdal_fast.__path__, "cdal_fast.")}
    assert set(result["imported"]) - {"cdal_fast._C"} == expected - {"cdal_fast._C"}
    assert set(result["features"]) == set(FEATURE_EXTRAS)
    for extra, outcome in result["features"].items():
        assert outcome["exit_code"] != 0, (extra, outcome)
        assert install_hint(extra) in outcome["output"], (extra, outcome["output"])


def test_segment_the_bundled_sample_from_outside(installed):
    sample = installed["site"] / "cdal_fast" / "samples" / "sample_ihc.ome.tif"
    t0 = time.perf_counter()
    res = _run([installed["bin"] / "cdal-fast", "segment", sample, "--out", "masks", "--votes", "1"],
               cwd=installed["outside"], env=installed["env"])
    installed.setdefault("notes", {})["segment"] = f"{time.perf_counter() - t0:.0f} s (--votes 1)"
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-2000:])
    out = installed["outside"] / "masks"
    for name in SAMPLE_OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "sample_ihc.json").read_text())
    assert summary["complete"] and summary["nuclei_count"] > 0
    assert summary["model"]["backend"] == "auto -> onnx"  # the fast CPU path is in the core
    features = json.loads((out / "sample_ihc.nuclei.geojson").read_text())["features"]
    assert len(features) == summary["nuclei_count"]


def test_other_torch_compiles_the_shipped_sources(installed):
    """Last: it edits the installed build record so that the prebuilt library counts as built for another torch."""
    record = installed["site"] / "cdal_fast" / "_C_build.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "torch": CLAIMED_TORCH}))
    env = {**installed["env"], "PATH": f"{installed['env']['PATH']}:{_ninja_dir()}"}
    t0 = time.perf_counter()
    res = _run([installed["bin"] / "cdal-fast", "info"], cwd=installed["outside"], env=env)
    installed.setdefault("notes", {})["compile on first use"] = f"{time.perf_counter() - t0:.0f} s"
    assert res.returncode == 0, res.stderr[-4000:]
    ops_line = next(x for x in res.stdout.splitlines() if x.startswith("C++ ops"))
    cache = Path(installed["env"]["CDAL_FAST_CACHE"]) / "ops"
    assert ops_line.startswith(f"C++ ops (torch.ops.cdal): compiled on first use at {cache}"), ops_line
    assert f"built for torch {CLAIMED_TORCH}, this is torch {torch.__version__}" in ops_line
    parity = _run([installed["py"], "-c", PARITY], cwd=installed["outside"], env=env)
    assert parity.returncode == 0, parity.stderr[-4000:]
    result = json.loads(next(x for x in parity.stdout.splitlines() if x.startswith("RESULT ")).removeprefix("RESULT "))
    assert result["kind"] == "compiled" and Path(result["path"]).parent.parent == cache
    assert result["adagn_silu"] < TOLERANCE and result["self_attention"] < TOLERANCE, result


def test_cpu_index_offers_a_cpu_torch(tmp_path):
    """The README's first step for CPU-only machines resolves to a CPU build without CUDA libraries.

    Resolved with ``--dry-run`` and this machine's pip settings ignored (``--isolated``), so the
    answer is the index's; skipped when the index cannot be reached from here.
    """
    report = tmp_path / "report.json"
    try:
        res = _run([sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed", "-q",
                    "--retries", "1", "--timeout", "60", "--report", report, "--index-url", CPU_INDEX, "torch"],
                   timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{CPU_INDEX} did not answer within {PIP_TIMEOUT_S} s")
    if res.returncode != 0:
        unreachable = [x for x in res.stderr.splitlines() if any(s in x for s in UNREACHABLE)]
        if unreachable:
            pytest.skip(f"{CPU_INDEX} unreachable from here: {unreachable[-1].strip()[:300]}")
        pytest.fail(res.stderr[-3000:])
    installs = json.loads(report.read_text())["install"]
    versions = {_name(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}
    assert versions["torch"].endswith("+cpu"), versions
    assert not [n for n in versions if n.startswith("nvidia-")], versions
