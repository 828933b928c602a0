"""Per-tile cost of every sampler variant against the original implementation's protocol, in one process.

    python bench/sampler_backends.py --device cuda --presets shipped monuseg --batches 1 8 64
    python bench/sampler_backends.py --device cuda --variants compile_bf16 --batches 8   # its own step
    python bench/sampler_backends.py --device cpu --presets tiny --batches 1 2           # smoke run

Per preset:

* ``original_protocol`` (batch 1): what the authors' code does per tile, re-implemented on our
  modules (:mod:`bench.authors_protocol`): votes one by one at batch 1, the full generator (condition
  encoder included) in every forward, eager float32. It is the baseline of ``x_vs_original``;
* per batch size B and variant (backend, dtype, fusion, memory layout, test-time augmentation as
  ``segment`` runs it): ms per 256x256 tile, ms per MoNuSeg-protocol tile (4 patches), generator
  forwards per second, seconds to build the sampler and run it once (``first_call_s``: CUDA-graph
  capture, ``torch.compile``), peak GPU memory, and the Dice between its masks and eager float32's
  masks on the same noise (TTA variants against eager float32 with TTA).

Every variant is built by :func:`cdal_fast.runtime.backends.build_sampler` from the same generator, which it
never changes (a channels-last variant converts a copy), so each row runs the layout it names.
Rows are written after every measurement (a step killed by its time limit still leaves a table);
``--budget-s`` stops starting new measurements and says so in the rows it skips.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cdal_fast.metrics import dice_iou
from cdal_fast.models import load_model
from cdal_fast.network.config import get_preset
from cdal_fast.network.generator import Generator
from cdal_fast.runtime.backends import BackendError, build_sampler
from cdal_fast.sampling.sampler import decode_mask, draw_noise, generators_from_seed

try:
    from bench.authors_protocol import authors_tile
    from bench.common import time_calls, write_results
except ImportError:  # run as a script
    from authors_protocol import authors_tile
    from common import time_calls, write_results

MONUSEG_PATCHES = 4  # a MoNuSeg tile is resized to 512x512 and cut into four 256x256 patches (spec section 8)


@dataclass(frozen=True)
class Variant:
    """One way of running the sampler; ``fused`` None is the backend's own choice."""

    backend: str
    dtype: torch.dtype
    fused: bool | None = None
    channels_last: bool = False
    tta: bool = False

    @property
    def reference(self) -> str:
        """The variant whose masks this one's are compared with: eager float32, with TTA when it has it."""
        return "eager_fp32_tta" if self.tta else "eager_fp32"


F32, BF16 = torch.float32, torch.bfloat16
# in the order they are measured: most telling first, so a time budget cuts the least useful rows
VARIANTS = {
    "eager_fp32": Variant("eager", F32),
    "graphs_bf16": Variant("graphs", BF16),
    "graphs_bf16_cl": Variant("graphs", BF16, channels_last=True),
    "eager_fp32_tta": Variant("eager", F32, tta=True),
    "graphs_bf16_tta": Variant("graphs", BF16, tta=True),
    "graphs_bf16_cl_tta": Variant("graphs", BF16, channels_last=True, tta=True),
    "eager_bf16": Variant("eager", BF16),
    "fused_bf16": Variant("fused", BF16),
    "graphs_plain_bf16": Variant("graphs", BF16, fused=False),
    "graphs_fp32": Variant("graphs", F32),
    "eager_bf16_cl": Variant("eager", BF16, channels_last=True),
    "fused_fp32": Variant("fused", F32),
    "compile_bf16": Variant("compile", BF16),
    "compile_bf16_cl": Variant("compile", BF16, channels_last=True),
}
DEFAULT_VARIANTS = [n for n in VARIANTS if not n.startswith("compile")]  # compile: its own step (recompiles per batch)

COLUMNS = ["preset", "batch", "variant", "ms_per_tile", "x_vs_original", "ms_per_monuseg_tile", "fwd_per_s",
           "first_call_s", "peak_gib", "dice_vs_fp32", "skipped"]


def generator_for(name: str, device: torch.device) -> Generator:
    """The shipped model, or a preset with seeded random weights (the paper-size network has no weights here)."""
    if name == "shipped":
        return load_model().generator.to(device)
    torch.manual_seed(0)
    return Generator(get_preset(name)).eval().to(device)


class Bench:
    """Runs the rows of one process, keeps them and rewrites the table after each."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dev = torch.device(args.device)
        self.sync = self.dev.type == "cuda"
        self.rows: list[dict] = []
        self.start = time.monotonic()
        self.name = args.name or f"sampler_{self.dev.type}"

    def over_budget(self) -> bool:
        return self.args.budget_s is not None and time.monotonic() - self.start > self.args.budget_s

    def record(self, row: dict) -> None:
        self.rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        write_table(self.name, self.rows, self.args.out, quiet=True)

    def reset_memory(self) -> None:
        if self.sync:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.sync else None

    def original_protocol(self, preset: str, gen: Generator) -> None:
        """The baseline row: one tile by the authors' protocol (batch 1, votes one by one)."""
        cfg, s = gen.cfg, gen.cfg.image_size
        image = torch.randn(1, cfg.img_channels, s, s, generator=torch.Generator().manual_seed(1)).to(self.dev)
        n = draw_noise(cfg.num_steps, cfg.votes, cfg.mask_channels, cfg.nz, s, s, generators_from_seed(0, 1))
        n = n.to(self.dev)
        z = n.z.reshape(cfg.num_steps, cfg.votes, cfg.nz)
        post = n.post.reshape(cfg.num_steps, cfg.votes, *n.post.shape[2:])
        self.reset_memory()
        t = time_calls(lambda: authors_tile(gen, image, n.x_init, z, post), warmup=1, min_time=self.args.min_time,
                       max_iters=self.args.max_iters, sync=self.sync)
        self.record({"preset": preset, "batch": 1, "variant": "original_protocol", "ms_per_tile": 1e3 * t,
                     "fwd_per_s": cfg.votes * cfg.num_steps / t, "peak_gib": self.peak_gib()})

    def variant(self, preset: str, gen: Generator, name: str, image: torch.Tensor, noise,
                refs: dict[str, torch.Tensor]) -> None:
        """One variant on one batch: build, time, compare its masks with the float32 reference's."""
        v = VARIANTS[name]
        base = {"preset": preset, "batch": image.shape[0], "variant": name}
        self.reset_memory()
        t0 = time.perf_counter()
        try:
            sampler = build_sampler(gen, None, None, v.backend, self.dev, v.dtype, tta=v.tta, fused=v.fused,
                                    channels_last=v.channels_last, max_batch=image.shape[0])
            n = noise.to(self.dev, v.dtype)
            img = image.to(v.dtype)
            with torch.inference_mode():
                prob, _ = sampler(img, n.x_init, n.z, n.post)
                if self.sync:
                    torch.cuda.synchronize()
                first = time.perf_counter() - t0
                t = time_calls(lambda: sampler(img, n.x_init, n.z, n.post), warmup=1, min_time=self.args.min_time,
                               max_iters=self.args.max_iters, sync=self.sync)
        except (BackendError, RuntimeError) as exc:  # one failing variant must not end the table
            self.record({**base, "skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"})
            return
        mask = decode_mask(prob.float().cpu(), gen.cfg)  # at the model's threshold
        if name == v.reference:
            refs[name] = mask
        dice = dice_iou(mask > 0, refs[v.reference] > 0)[0] if v.reference in refs else None
        b = image.shape[0]
        forwards = b * gen.cfg.votes * gen.cfg.num_steps
        self.record({**base, "ms_per_tile": 1e3 * t / b, "ms_per_monuseg_tile": 1e3 * t * MONUSEG_PATCHES / b,
                     "fwd_per_s": forwards / t, "first_call_s": first, "peak_gib": self.peak_gib(),
                     "dice_vs_fp32": dice})

    def preset(self, preset: str) -> None:
        gen = generator_for(preset, self.dev)
        cfg, s = gen.cfg, gen.cfg.image_size
        if not self.args.no_original and not self.over_budget():
            self.original_protocol(preset, gen)
        for b in self.args.batches:
            image = torch.randn(b, cfg.img_channels, s, s, generator=torch.Generator().manual_seed(b)).to(self.dev)
            noise = draw_noise(cfg.num_steps, cfg.votes, cfg.mask_channels, cfg.nz, s, s, generators_from_seed(0, b))
            refs: dict[str, torch.Tensor] = {}
            wanted = list(self.args.variants)
            # the references first, whether asked for or not: every row's Dice needs its own
            needed = list(dict.fromkeys([VARIANTS[n].reference for n in wanted] + wanted))
            for name in needed:
                if self.over_budget():
                    self.record({"preset": preset, "batch": b, "variant": name, "skipped": "time budget"})
                    continue
                self.variant(preset, gen, name, image, noise, refs)

    def run(self) -> None:
        if self.sync:
            torch.backends.cudnn.benchmark = True
        for preset in self.args.presets:
            self.preset(preset)
        write_table(self.name, self.rows, self.args.out, quiet=False)


def write_table(name: str, rows: list[dict], out: Path, quiet: bool) -> None:
    """JSON + Markdown; ``x_vs_original`` = the preset's original-protocol ms per tile / the row's."""
    baseline = {r["preset"]: r["ms_per_tile"] for r in rows if r["variant"] == "original_protocol"}
    for r in rows:
        if r.get("ms_per_tile") and r["preset"] in baseline:
            r["x_vs_original"] = baseline[r["preset"]] / r["ms_per_tile"]
    note = ("ms_per_tile: one 256x256 tile, all T x V denoiser passes; x_vs_original: the original protocol's "
            "ms per tile (batch 1, votes one by one, encoder in every forward, eager float32) / the row's; "
            f"TF32 for cuDNN convolutions: {torch.backends.cudnn.allow_tf32}, for matmuls: "
            f"{torch.backends.cuda.matmul.allow_tf32}")
    write_results(name, rows, COLUMNS, out, quiet=quiet, note=note)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", nargs="+", default=["shipped", "monuseg"],
                    help="'shipped' (the shipped nuclei model) or preset names (seeded random weights)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    ap.add_argument("--no-original", action="store_true", help="skip the original-protocol baseline row")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per row (after warm-up)")
    ap.add_argument("--max-iters", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="Stop starting new measurements after this many seconds (rows say so).")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--name", default=None, help="result file name (default: sampler_<device>)")
    return ap.parse_args(argv)


if __name__ == "__main__":
    Bench(parse_args()).run()
