#!/usr/bin/env bash
# Compile the CUDA build of cdal_fast._C (CPU kernels + CUDA kernels + the ATen glue) against a CUDA
# wheel of torch on a machine with nvcc but no GPU, and check that the CUDA kernels register.
# CI cannot do this (the CUDA wheel is several GB); run it before spending GPU time.
#   bash scripts/check_cuda_build.sh [venv folder]      (TORCH_VERSION=2.14.1 by default)
set -euo pipefail
VENV=${1:-/tmp/cdal-cuda-venv}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==${TORCH_VERSION:-2.14.1}" numpy setuptools ninja
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# The wheel's CUDA libraries ship headers (cusparse.h, cublas_v2.h ...) that a bare toolkit may lack.
CPATH=$(printf '%s:' "$SITE"/nvidia/cu*/include)${CPATH:-}
export CPATH CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
(cd "$ROOT" && git ls-files -z | xargs -0 tar -cf - | tar -xf - -C "$BUILD")
cd "$BUILD"
"$VENV/bin/python" setup.py build_ext --inplace > build.log 2>&1 || { tail -40 build.log; exit 1; }
"$VENV/bin/python" - <<'PY'
import glob

import torch

torch.ops.load_library(glob.glob("cdal_fast/_C*.so")[0])  # the library alone: the package needs more than torch
for op in ("adagn_silu", "self_attention"):
    dump = torch._C._dispatch_dump(f"cdal::{op}")
    keys = [line.split(":")[0] for line in dump.splitlines() if ": registered at" in line]
    print(f"cdal::{op}: {keys}")
    assert {"CPU", "CUDA", "Meta"} <= set(keys), f"cdal::{op} lacks a kernel: {keys}"
print(f"CUDA build OK against torch {torch.__version__}")
PY
