"""What the package declares (pyproject.toml) against what its code and tests import.

The core install must import every module; optional features import their package when used and
name the extra that installs it (``cdal_fast.extras``). These checks read the source with ``ast`` and
pyproject.toml with ``tomllib``, so they run in the developers' environment, where every extra is
installed; ``tests/test_wheel.py`` checks the same claims in a real core-only install.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.metadata as md
import pkgutil
import re
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

import cdal_fast
from cdal_fast.cli import main
from cdal_fast.extras import EXTRA_OF, MissingExtraError, import_extra
from cdal_fast.wsi.readers import SlideError, open_slide

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cdal_fast"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Imported by cdal_fast but deliberately in no extra: TensorRT's wheel must match the CUDA version
# (docs/compiled.md), so `--backend tensorrt` names the package to install itself.
OUTSIDE_EXTRAS = {"tensorrt"}
FEATURE_EXTRAS = ("codecs", "openslide", "dicom", "nifti", "ray", "parquet")
# Imported by tests but not packages: the repository's own folders.
LOCAL_TEST_IMPORTS = {"cdal_fast", "tests", "bench", "gpu_kit", "gpu_kit_hide", "gpu_kit_steps", "distill_targets",
                      "scripts"}


def _name(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement string."""
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _extra_names(requirement: str) -> list[str]:
    inside = re.search(r"\[([^\]]*)\]", requirement)
    return [e.strip() for e in inside.group(1).split(",")] if inside else []


def distributions(extras: tuple[str, ...] = ()) -> set[str]:
    """Distribution names the core plus ``extras`` install directly (self-references expanded)."""
    optional = PYPROJECT["project"]["optional-dependencies"]
    names = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in optional[extra]:
            if _name(req) == "cdal-fast":
                todo += _extra_names(req)
            else:
                names.add(_name(req))
    return names


@functools.cache
def _providers() -> dict[str, list[str]]:
    return md.packages_distributions()


def _provider(module: str) -> set[str]:
    """Distributions installing top-level ``module`` here (all extras are installed in the dev set-up)."""
    return {d.lower().replace("_", "-") for d in _providers().get(module, [])}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """Top-level third-party names ``path`` imports: (at module level, anywhere)."""
    tree = ast.parse(path.read_text())
    top_level = set(id(n) for n in tree.body)
    anywhere, module_level = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = {node.module.split(".")[0]}
        else:
            continue
        names -= set(sys.stdlib_module_names) | {"cdal_fast"}
        anywhere |= names
        if id(node) in top_level:
            module_level |= names
    return module_level, anywhere


def test_module_level_imports_are_core_and_lazy_ones_core_or_extras():
    core = distributions()
    for path in sorted(PACKAGE.rglob("*.py")):
        module_level, anywhere = _imports(path)
        for name in module_level:
            assert _provider(name) & core, f"{path}: imports {name} at module level, which the core does not install"
        for name in anywhere - module_level:
            ok = _provider(name) & core or name in EXTRA_OF or name in OUTSIDE_EXTRAS
            assert ok, f"{path}: imports {name}, which neither the core nor an extra (cdal_fast.extras) provides"


def test_extras_table_matches_pyproject():
    optional = PYPROJECT["project"]["optional-dependencies"]
    core = distributions()
    for module, extra in EXTRA_OF.items():
        assert extra in optional, f"{module}: extra {extra!r} is not in pyproject.toml"
        provider = _provider(module)
        assert provider, f"{module} is not installed in the developers' set-up (scripts/setup.sh installs all extras)"
        assert provider & distributions((extra,)), f"extra {extra!r} does not install {module} ({provider})"
        assert not provider & core, f"{module} is a core dependency; it needs no extra"
    assert set(EXTRA_OF.values()) == set(FEATURE_EXTRAS)
    assert distributions(("all",)) == distributions(FEATURE_EXTRAS), "'all' must be every feature extra"


def test_dev_extra_installs_what_the_tests_import():
    """hypothesis was once missing from `dev`: every package a test imports comes from core, dev or all."""
    installed = distributions(("dev", "all"))
    for path in sorted((REPO / "tests").glob("*.py")):
        _, anywhere = _imports(path)
        for name in anywhere - LOCAL_TEST_IMPORTS - OUTSIDE_EXTRAS:
            assert _provider(name) & installed, f"{path.name} imports {name}, which no extra of the set-up installs"


def test_setup_installs_from_pyproject():
    """One list of dependencies: the set-up installs the package with its extras, from pyproject.toml."""
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "requirements" not in setup
    assert re.search(r'pip install -q --no-build-isolation -e "\.\[\$EXTRAS\]"', setup)
    assert 'EXTRAS=${CDAL_EXTRAS:-dev,all}' in setup
    torch_pins = [r for r in PYPROJECT["build-system"]["requires"] if _name(r) == "torch"]
    assert len(torch_pins) == 1 and "==" in torch_pins[0], "the set-up reads the CPU torch pin from [build-system]"


def test_requires_python_is_the_one_the_dependencies_allow():
    """scikit-image >= 0.26 needs Python >= 3.11; a lower floor would promise installs that cannot resolve."""
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py311"


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(cdal_fast.__path__, "cdal_fast.")]
    assert "cdal_fast.wsi.readers" in names and "cdal_fast.extras" in names
    for name in names:
        importlib.import_module(name)


def test_import_extra_names_the_extra(monkeypatch):
    for name in ("nibabel", "nibabel.orientations"):  # how Python sees a package that is not installed
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingExtraError, match=r"reorienting volumes needs the nibabel package: "
                                                r"pip install 'cdal-fast\[nifti\]'"):
        import_extra("nibabel.orientations", "reorienting volumes")
    with pytest.raises(SlideError, match=r"pip install 'cdal-fast\[nifti\]'"):
        import_extra("nibabel", "x.nii.gz: reading NIfTI volumes", SlideError)


def test_dicom_slide_without_pydicom_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    (tmp_path / "slide").mkdir()
    (tmp_path / "slide" / "level0.dcm").write_bytes(b"\0" * 132)
    with pytest.raises(SlideError, match=r"reading DICOM slides needs the pydicom package: "
                                         r"pip install 'cdal-fast\[dicom\]'"):
        open_slide(tmp_path / "slide")


def test_volume_without_nibabel_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nibabel", None)
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"\0" * 352)
    res = CliRunner().invoke(main, ["segment", str(scan), "--model", "hippocampus", "--backend", "eager",
                                  "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert "pip install 'cdal-fast[nifti]'" in res.output, res.output
