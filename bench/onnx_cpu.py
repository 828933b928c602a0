"""Sampler tiles/s on the CPU: eager PyTorch (float32) vs. the ONNX graph in onnxruntime.

    python bench/onnx_cpu.py                 # the shipped model, batch 1
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from cdal_fast.models import load_model
from cdal_fast.runtime.onnx_export import export_onnx
from cdal_fast.runtime.onnx_tensorrt import OnnxSampler
from cdal_fast.sampling.sampler import FixedStepSampler, draw_noise, generators_from_seed

try:
    from bench.common import time_calls, write_results
except ImportError:  # run as a script
    from common import time_calls, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--min-time", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    bundle = load_model(args.weights)
    gen, cfg = bundle.generator, bundle.config
    eager = FixedStepSampler(gen).eval()
    s = cfg.image_size
    image = torch.randn(args.batch, cfg.img_channels, s, s)
    n = draw_noise(eager.num_steps, eager.votes, cfg.mask_channels, cfg.nz, s, s, generators_from_seed(0, args.batch))
    with tempfile.TemporaryDirectory() as tmp:
        ort = OnnxSampler(export_onnx(gen, Path(tmp) / "s.onnx", weights_sha256=bundle.sha256), gen, bundle.sha256)
        with torch.inference_mode():
            t_eager = time_calls(lambda: eager(image, n.x_init, n.z, n.post), min_time=args.min_time)
            p_eager, _ = eager(image, n.x_init, n.z, n.post)
        t_ort = time_calls(lambda: ort(image, n.x_init, n.z, n.post), min_time=args.min_time)
        p_ort, _ = ort(image, n.x_init, n.z, n.post)
    row = {"model": cfg.name, "batch": args.batch, "T": eager.num_steps, "V": eager.votes,
           "eager_tiles_per_s": args.batch / t_eager, "onnxruntime_tiles_per_s": args.batch / t_ort,
           "ratio": t_eager / t_ort, "max_abs_diff": (p_ort - p_eager).abs().max().item()}
    print(row)
    write_results("onnx_cpu", [row], list(row), args.out)


if __name__ == "__main__":
    main()
