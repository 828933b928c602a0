#!/usr/bin/env bash
# One-command set-up on a fresh machine: virtual environment, pinned dependencies (CPU torch),
# the package in editable mode and its C++ op library. Re-running is cheap and safe.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
if [ "${CDAL_KEEP_TORCH:-0}" = "1" ]; then
  # GPU machines: keep the CUDA torch already installed in .venv, install everything else.
  grep -v '^torch==' requirements.txt > .venv/requirements-notorch.txt
  .venv/bin/python -m pip install -q -r .venv/requirements-notorch.txt
else
  .venv/bin/python -m pip install -q -r requirements.txt
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
# --no-build-isolation: build against the torch just installed (never a second, CUDA one).
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -c "import cdal_fast, sys; print('cdal-fast', cdal_fast.__version__, '| C++ ops:', cdal_fast.ops.extension_available())"
