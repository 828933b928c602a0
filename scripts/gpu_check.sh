#!/usr/bin/env bash
# Prepared command for a lent GPU (issue: GPU speed): build the CUDA extension, run the op/sampler
# tests on CUDA, then the backend throughput table and the op micro-benchmark.
# Usage on the device machine: bash scripts/gpu_check.sh "$OUT"   (about 5 minutes on an H100)
set -uo pipefail
OUT=${1:?output folder}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
( time python3 setup.py build_ext --inplace ) > "$OUT/build.txt" 2>&1 || { tail -40 "$OUT/build.txt"; exit 1; }
tail -3 "$OUT/build.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_fir.py tests/test_sampler.py \
  -k "not cmake and not nvcc" 2>&1 | tail -15 | tee "$OUT/pytest_cuda.txt"
timeout 400 python3 bench/sampler_backends.py --device cuda --presets monuseg shipped --batches 1 4 16 64 \
  --budget-s 330 --out "$OUT" --name sampler_cuda 2>&1 | tail -45
timeout 120 python3 bench/ops_cpu.py --device cuda --dtype bfloat16 --out "$OUT" 2>&1 | tail -9
