#!/usr/bin/env bash
# One-command set-up on a fresh machine: virtual environment, the pinned CPU torch, then the package
# in editable mode with its C++ op library and the extras developers need. pyproject.toml is the one
# list of dependencies (core, extras, and the torch pin in [build-system]). Re-running is cheap and safe.
#   CDAL_KEEP_TORCH=1  keep the torch already in .venv (GPU machines: a CUDA build; see README)
#   CDAL_EXTRAS=...    extras to install (default dev,all: test tools and every optional feature)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${CDAL_EXTRAS:-dev,all}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -c 'import sys; sys.exit(None if sys.version_info >= (3, 11) else
  f"cdal-fast needs Python >= 3.11 (scikit-image >= 0.26); .venv has {sys.version.split()[0]}: "
  "remove .venv and rerun with PYTHON=python3.11 (or newer)")'
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
if [ "${CDAL_KEEP_TORCH:-0}" = "1" ]; then
  # GPU machines: keep the CUDA torch already installed in .venv (it satisfies the package's torch>=2.4).
  .venv/bin/python -c 'import torch' 2>/dev/null \
    || echo "warning: CDAL_KEEP_TORCH=1 but .venv has no torch; pip will choose one" >&2
else
  # The CPU wheel pinned in [build-system] (on these machines torch==X is the CPU build: no CUDA download).
  TORCH_PIN=$(.venv/bin/python -c 'import tomllib
reqs = tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]
print(next(r for r in reqs if r.startswith("torch")))')
  .venv/bin/python -m pip install -q "$TORCH_PIN"
fi
# libtiff headers for the C++ example (examples/cpp); best effort, only where apt and root exist.
if ! dpkg -s libtiff-dev >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q libtiff-dev >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtiff-dev >/dev/null 2>&1; } \
    || echo "warning: libtiff-dev could not be installed; the C++ example will not build" >&2
fi
# Debian's chromium for the batch report's headless-browser test (tests/test_report.py skips without it);
# best effort, only where apt and root exist.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
    || echo "warning: chromium could not be installed; the report's browser test will be skipped" >&2
fi
# --no-build-isolation: build the ops against the torch just installed (never a second, CUDA one);
# the dependencies come from pyproject.toml, and the installed torch already satisfies torch>=2.4.
.venv/bin/python -m pip install -q --no-build-isolation -e ".[$EXTRAS]"
.venv/bin/python -c "import cdal_fast; print('cdal-fast', cdal_fast.__version__, '| C++ ops:', cdal_fast.ops.extension_status().describe())"
