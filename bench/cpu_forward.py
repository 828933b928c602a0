"""CPU micro-benchmark: generator forwards/s with and without condition-encoder reuse.

"reuse" runs ``denoise`` on a precomputed ``c`` (what the sampler does for every step and vote);
"full" runs ``forward`` (encoder + denoiser), which is what the authors' code does per step.

    python bench/cpu_forward.py --presets tiny cxr --batch 1 --out bench/results
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cdal_fast.network import ops
from cdal_fast.network.config import get_preset
from cdal_fast.network.generator import Generator

try:
    from bench.common import time_calls, write_results
except ImportError:  # run as a script
    from common import time_calls, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "cxr"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=None, help="input size (default: the preset's)")
    ap.add_argument("--min-time", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    rows = []
    torch.manual_seed(0)
    for name in args.presets:
        cfg = get_preset(name)
        s = args.size or cfg.image_size
        g = Generator(cfg).eval()
        x = torch.randn(args.batch, cfg.mask_channels, s, s)
        y = torch.randn(args.batch, cfg.img_channels, s, s)
        z = torch.randn(args.batch, cfg.nz)
        k = torch.zeros(args.batch, dtype=torch.long)
        with torch.inference_mode():
            c = g.encode(y)
            t_full = time_calls(lambda: g(x, k, y, z), min_time=args.min_time)
            t_reuse = time_calls(lambda: g.denoise(x, k, c, z), min_time=args.min_time)
            row = {"preset": name, "size": s, "batch": args.batch,
                   "full_fwd_per_s": args.batch / t_full, "reuse_fwd_per_s": args.batch / t_reuse,
                   "speedup": t_full / t_reuse}
            if ops.extension_available():
                g.set_fused(True)
                t_fused = time_calls(lambda: g.denoise(x, k, c, z), min_time=args.min_time)
                g.set_fused(False)
                row["reuse_fused_fwd_per_s"] = args.batch / t_fused
        rows.append(row)
        print(rows[-1], flush=True)
    write_results("cpu_forward", rows, ["preset", "size", "batch", "full_fwd_per_s", "reuse_fwd_per_s", "speedup",
                                        "reuse_fused_fwd_per_s"], args.out)


if __name__ == "__main__":
    main()
