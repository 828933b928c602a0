#!/usr/bin/env bash
# Issue 23 part B in one call on a lent GPU: build the CUDA extension, run the CUDA tests, then the
# bench tables. Ordered most important first, each step under its own timeout, so a run cut short
# still returns the build log and the test results. Everything lands in the folder given.
#
#   bash scripts/gpu_check.sh "$OUT"        (timeouts sum to < 600 s, one device call; needs a CUDA torch;
#                                            PYTHON=... picks the interpreter, default python3)
#
# Steps (files under OUT):
#   1. gpu.txt, build.txt        GPU name/driver; setup.py build_ext --inplace (kernels + ATen glue)
#   2. pytest_cuda.txt           op / FIR / sampler / graphs / builder tests on CUDA, including the
#                                adagn parity at (320, 64, 256, 256) bf16 channels-last (grid-stride
#                                loop) and the argument checks of the CUDA glue
#   3. segment_*.txt, dice.txt   segment --backend graphs with the default workers against eager
#                                float32 on the bundled sample slide (mask Dice on the same noise)
#   4. sampler_cuda.{json,md}    bench/sampler_backends.py: eager fp32 baseline, eager bf16, fused,
#                                CUDA graphs, torch.compile; batches 1, 4, 16, 64; monuseg + shipped
#   5. ops_cuda_bfloat16.*       the op micro-benchmark on CUDA
#   6. pytest_tensorrt.txt       the TensorRT engine test, only where `import tensorrt` works
set -uo pipefail
OUT=${1:?output folder}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PY=${PYTHON:-python3}
step() { echo "== $(date -u +%H:%M:%S) $*"; }

step "1 build"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
( time timeout 200 "$PY" setup.py build_ext --inplace ) > "$OUT/build.txt" 2>&1 \
  || { tail -40 "$OUT/build.txt"; echo "build failed: nothing else can run"; exit 1; }
tail -3 "$OUT/build.txt"

step "2 CUDA tests"
timeout 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_fir.py tests/test_sampler.py \
  tests/test_graphs.py -k "not cmake and not nvcc" 2>&1 | tail -20 | tee "$OUT/pytest_cuda.txt"

step "3 segment --backend graphs vs eager float32"
SLIDE=cdal_fast/samples/sample_ihc.ome.tif
for b in graphs eager; do
  dt=$([ "$b" = graphs ] && echo bfloat16 || echo float32)
  timeout 50 "$PY" -m cdal_fast.cli segment "$SLIDE" --out "$OUT/seg_$b" --device cuda --backend "$b" \
    --dtype "$dt" -q > "$OUT/segment_$b.txt" 2>&1; echo "segment $b rc=$?"; tail -2 "$OUT/segment_$b.txt"
done
timeout 15 "$PY" - "$OUT" <<'EOF' 2>&1 | tee "$OUT/dice.txt"
import sys, pathlib, numpy as np, tifffile
out = pathlib.Path(sys.argv[1])
a, b = (tifffile.imread(next((out / f"seg_{k}").glob("*.mask.ome.tif"))) > 127 for k in ("graphs", "eager"))
print(f"graphs bf16 vs eager fp32 mask Dice: {2 * (a & b).sum() / max(a.sum() + b.sum(), 1):.4f}")
EOF

step "4 sampler backends"
timeout 140 "$PY" bench/sampler_backends.py --device cuda --presets monuseg shipped --batches 1 4 16 64 \
  --budget-s 110 --out "$OUT" --name sampler_cuda 2>&1 | tail -45

step "5 op micro-benchmark"
timeout 30 "$PY" bench/ops_cpu.py --device cuda --dtype bfloat16 --out "$OUT" 2>&1 | tail -9

step "6 TensorRT (only where installed)"
if "$PY" -c "import tensorrt" 2>/dev/null; then
  timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_onnx.py -k tensorrt 2>&1 | tail -8 \
    | tee "$OUT/pytest_tensorrt.txt"
else
  echo "tensorrt not installed: skipped" | tee "$OUT/pytest_tensorrt.txt"
fi
step "done"
