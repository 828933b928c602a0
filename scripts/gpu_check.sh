#!/usr/bin/env bash
# The GPU run kit in one command (scripts/gpu_kit.py says what it does; docs/benchmarks.md how to call it).
#   bash scripts/gpu_check.sh "$OUT"              on a lent GPU: carry .whl (python3 there holds the CUDA torch)
#   bash scripts/gpu_check.sh --dry-run OUT       every step on this CPU at tiny sizes (PYTHON=.venv/bin/python)
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_kit.py "$@"
