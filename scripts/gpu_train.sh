#!/usr/bin/env bash
# The one prepared training command for a lent GPU (see docs/training.md): environment facts, the CUDA
# variants of the unit tests, then a budgeted training run + validation of one task.
# Usage on the device machine:
#   bash scripts/gpu_train.sh "$OUT" [minutes] [config] [data]
#   bash scripts/gpu_train.sh "$OUT" 7.0 train/monuseg_s.json .gpu/monuseg512   (the shipped MoNuSeg model)
#   bash scripts/gpu_train.sh "$OUT" 4.0 train/cxr_budget.json .gpu/cxr
# Data travels in the git-ignored .gpu/ folder (carry it): scripts/make_compact_monuseg.py for MoNuSeg,
# a plain copy for cxr (7 MiB) and hippocampus (16 MiB).
set -uo pipefail
OUT=${1:?output folder}
MIN=${2:-7.0}
CONFIG=${3:-train/monuseg_s.json}
DATA=${4:-.gpu/monuseg512}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_fir.py tests/test_sampler.py 2>&1 | tail -3 | tee "$OUT/pytest_cuda.txt"
python3 scripts/train_budget.py --config "$CONFIG" --data "$DATA" --out "$OUT" --minutes "$MIN" 2>&1 | tee "$OUT/train.txt"
