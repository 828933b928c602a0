"""Sampler throughput of every backend against the plain eager float32 model, in one process.

    python bench/sampler_backends.py --device cuda --presets monuseg shipped --batches 1 4 16 64
    python bench/sampler_backends.py --device cpu --presets tiny --batches 1 2      # smoke run

Per preset and batch size B (tiles):
* ``baseline_fwd_per_s``: the authors' math: eager float32 full generator forward (condition encoder
  recomputed every call), B forwards per call;
* per backend: generator forwards/s inside the sampler (B x V x T forwards per call), ms per
  MoNuSeg-protocol tile (4 patches x V x T: one sampler call on B = 4, scaled), peak GPU memory, and
  the Dice between its masks and the float32 sampler's masks on the same noise.
Writes JSON + Markdown (+ a PNG plot when matplotlib is installed) under --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cdal_fast.backends import BackendError, build_sampler
from cdal_fast.config import get_preset
from cdal_fast.generator import Generator
from cdal_fast.metrics import dice_iou
from cdal_fast.models import load_model
from cdal_fast.sampler import decode_mask, draw_noise, generators_from_seed

try:
    from bench.common import time_calls, write_results
except ImportError:  # run as a script
    from common import time_calls, write_results

# name -> (backend, dtype, channels_last)
BACKENDS = {
    "eager_fp32": ("eager", torch.float32, False),
    "eager_bf16": ("eager", torch.bfloat16, True),
    "fused_bf16": ("fused", torch.bfloat16, True),
    "graphs_bf16": ("graphs", torch.bfloat16, True),
    "compile_bf16": ("compile", torch.bfloat16, True),
}


def generator_for(name: str) -> Generator:
    if name == "shipped":
        return load_model().generator
    torch.manual_seed(0)
    return Generator(get_preset(name)).eval()


COLUMNS = ["preset", "batch", "backend", "fwd_per_s", "x_vs_authors_fp32", "ms_per_monuseg_tile", "peak_gib",
           "dice_vs_fp32", "skipped"]


def measure_backend(name: str, gen: Generator, image: torch.Tensor, noise, dev: torch.device, min_time: float,
                    ref_mask: torch.Tensor | None) -> tuple[dict, torch.Tensor | None]:
    """One backend on one batch: throughput, peak memory and mask agreement with the fp32 masks."""
    backend, dtype, cl = BACKENDS[name]
    sync = dev.type == "cuda"
    gen.set_fused(False)
    gen.to(dtype=torch.float32)
    if cl and sync:
        gen.to(memory_format=torch.channels_last)
    try:
        sampler = build_sampler(gen, None, None, backend, dev, dtype)
    except BackendError as exc:
        return {"skipped": str(exc)}, None
    n = noise.to(dev, dtype)
    img = image.to(dtype)
    if sync:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with torch.inference_mode():
            t = time_calls(lambda: sampler(img, n.x_init, n.z, n.post), warmup=2, min_time=min_time, sync=sync)
            prob, _ = sampler(img, n.x_init, n.z, n.post)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:  # one failing backend must not end the table
        return {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}, None
    mask = decode_mask(prob.float().cpu(), gen.cfg)  # at the model's threshold
    dice, _ = dice_iou(mask > 0, (ref_mask if ref_mask is not None else mask) > 0)
    b = image.shape[0]
    forwards = b * gen.cfg.votes * gen.cfg.num_steps  # build_sampler(None, None): the preset's T and V
    return {"fwd_per_s": forwards / t, "ms_per_monuseg_tile": 1e3 * t * 4 / b,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if sync else None, "dice_vs_fp32": dice}, mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", nargs="+", default=["monuseg", "shipped"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS))
    ap.add_argument("--min-time", type=float, default=2.0)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="Stop starting new measurements after this many seconds (rows say so).")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--name", default=None, help="result file name (default: sampler_<device>)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = dev.type == "cuda"
    if sync:
        torch.backends.cudnn.benchmark = True
    name = args.name or f"sampler_{dev.type}"
    start = time.monotonic()
    rows: list[dict] = []

    def over_budget() -> bool:
        return args.budget_s is not None and time.monotonic() - start > args.budget_s

    def record(row: dict) -> None:
        rows.append(row)
        print(row, flush=True)
        write_table(name, rows, args.out)  # after every row: a timeout still leaves a table

    for preset in args.presets:
        gen = generator_for(preset).to(dev)
        cfg = gen.cfg
        s = cfg.image_size
        for b in args.batches:
            base = {"preset": preset, "batch": b}
            if over_budget():
                record({**base, "backend": "all", "skipped": "time budget"})
                continue
            image = torch.randn(b, cfg.img_channels, s, s, generator=torch.Generator().manual_seed(b)).to(dev)
            gen.set_fused(False)
            gen.float()
            x = torch.randn(b, cfg.mask_channels, s, s, device=dev)
            z = torch.randn(b, cfg.nz, device=dev)
            k = torch.zeros(b, dtype=torch.long, device=dev)
            with torch.inference_mode():
                t = time_calls(lambda: gen(x, k, image, z), min_time=args.min_time, sync=sync)
            record({**base, "backend": "authors_eager_fp32_forward", "fwd_per_s": b / t})
            noise = draw_noise(cfg.num_steps, cfg.votes, cfg.mask_channels, cfg.nz, s, s,
                               generators_from_seed(0, b))
            ref_mask = None
            for backend in args.backends:
                if over_budget():
                    record({**base, "backend": backend, "skipped": "time budget"})
                    continue
                result, mask = measure_backend(backend, gen, image, noise, dev, args.min_time, ref_mask)
                if ref_mask is None:
                    ref_mask = mask
                record({**base, "backend": backend, **result})
    write_table(name, rows, args.out, plot=args.presets, backends=args.backends, device=dev)


def write_table(name: str, rows: list[dict], out: Path, plot: list[str] | None = None,
                backends: list[str] | None = None, device: torch.device | None = None) -> None:
    """JSON + Markdown (ratios to the authors' eager fp32 forward of the same preset and batch), PNG plot."""
    baseline = {(r["preset"], r["batch"]): r["fwd_per_s"] for r in rows if r["backend"] == "authors_eager_fp32_forward"}
    for r in rows:
        if "fwd_per_s" in r and (r["preset"], r["batch"]) in baseline:
            r["x_vs_authors_fp32"] = r["fwd_per_s"] / baseline[(r["preset"], r["batch"])]
    write_results(name, rows, COLUMNS, out, quiet=plot is None)
    if plot is None:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(plot), figsize=(6 * len(plot), 4), squeeze=False)
    where = torch.cuda.get_device_name(0) if device is not None and device.type == "cuda" else "cpu"
    for ax, preset in zip(axes[0], plot):
        for backend in ["authors_eager_fp32_forward", *(backends or [])]:
            pts = [(r["batch"], r["fwd_per_s"]) for r in rows
                   if r["preset"] == preset and r["backend"] == backend and "fwd_per_s" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=backend)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (tiles)")
        ax.set_ylabel("generator forwards / s")
        ax.set_title(f"{preset} on {where}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
