"""Micro-benchmark: each fused cdal op against its unfused plain-PyTorch composition.

    python bench/ops_cpu.py [--device cuda] [--dtype bfloat16]

Shapes are the layers cDAL runs most (MoNuSeg-preset widths at 256x256 input).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cdal_fast.network import ops
from cdal_fast.sampling.inference import DTYPES

try:
    from bench.common import time_calls, write_results
except ImportError:  # run as a script
    from common import time_calls, write_results

ADAGN = [(4, 64, 256, 256, 16), (4, 128, 64, 64, 32), (4, 256, 16, 16, 32)]
ATTN = [(4, 128, 16, 16, 32), (4, 256, 16, 16, 32), (4, 256, 8, 8, 32)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--name", default=None, help="result file name (default: ops_<device>_<dtype>)")
    args = ap.parse_args()
    if not ops.extension_available():
        raise SystemExit("build the extension first: bash scripts/setup.sh")
    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    sync = dev.type == "cuda"
    rows = []
    with torch.inference_mode():
        for n, c, h, w, g in ADAGN:
            x = torch.randn(n, c, h, w, device=dev, dtype=dt)
            gamma, beta, bias = (torch.randn(n, c, device=dev) for _ in range(3))
            t_ref = time_calls(lambda: ops.adagn_silu_reference(x, gamma, beta, bias, g, 1e-6), min_time=args.min_time,
                               sync=sync)
            t_fused = time_calls(lambda: ops.adagn_silu(x, gamma, beta, bias, g, 1e-6), min_time=args.min_time,
                                 sync=sync)
            rows.append({"op": "adagn_silu", "shape": f"{n}x{c}x{h}x{w}", "unfused_ms": 1e3 * t_ref,
                         "fused_ms": 1e3 * t_fused, "speedup": t_ref / t_fused})
            print(rows[-1], flush=True)
        for n, c, h, w, g in ATTN:
            x = torch.randn(n, c, h, w, device=dev, dtype=dt)
            a = [torch.randn(c, device=dev, dtype=dt), torch.randn(c, device=dev, dtype=dt),
                 torch.randn(3 * c, c, 1, 1, device=dev, dtype=dt) / c**0.5, torch.randn(3 * c, device=dev, dtype=dt),
                 torch.randn(c, c, 1, 1, device=dev, dtype=dt) / c**0.5, torch.randn(c, device=dev, dtype=dt)]
            t_ref = time_calls(lambda: ops.self_attention_reference(x, *a, g, 1e-6), min_time=args.min_time, sync=sync)
            t_fused = time_calls(lambda: ops.self_attention(x, *a, g, 1e-6), min_time=args.min_time, sync=sync)
            rows.append({"op": "self_attention", "shape": f"{n}x{c}x{h}x{w}", "unfused_ms": 1e3 * t_ref,
                         "fused_ms": 1e3 * t_fused, "speedup": t_ref / t_fused})
            print(rows[-1], flush=True)
    columns = ["op", "shape", "unfused_ms", "fused_ms", "speedup"]
    write_results(args.name or f"ops_{dev.type}_{args.dtype}", rows, columns, args.out)


if __name__ == "__main__":
    main()
