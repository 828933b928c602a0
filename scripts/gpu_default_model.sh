#!/usr/bin/env bash
# The one prepared command for the lent GPU (see docs/training.md): environment facts, the CUDA
# variants of the unit tests, then the budgeted training run of the shipped MoNuSeg model.
# Usage on the device machine: bash scripts/gpu_default_model.sh "$OUT" [minutes]
set -uo pipefail
OUT=${1:?output folder}
MIN=${2:-7.0}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_fir.py tests/test_sampler.py 2>&1 | tail -3 | tee "$OUT/pytest_cuda.txt"
python3 scripts/train_default_gpu.py --data .gpu/monuseg512 --out "$OUT" --minutes "$MIN" 2>&1 | tee "$OUT/train.txt"
