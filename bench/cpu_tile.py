"""Seconds per 256x256 tile on the CPU: the original protocol against every cdal-fast CPU path, in one process.

    python bench/cpu_tile.py                       # full run (< 15 min on a quiet 2-core CPU)
    python bench/cpu_tile.py --quick               # 2 rounds, 2 tiles, no torch.compile (smoke run)
    python bench/cpu_tile.py --paths authors eager_fp32 onnx_tuned auto

One tile = one 256x256 crop of a real MoNuSeg validation tile (``--data``, the spec's protocol:
1000 -> 512, quarters), the shipped model's layout, T and V (4 x 5). Paths:

* ``authors``: the original implementation's protocol (:mod:`bench.authors_protocol`): votes one
  by one at batch 1, the full generator (condition encoder included) in every call. The baseline.
* ``eager_fp32``: ``FixedStepSampler`` as it is (encoder once per tile, votes batched).
* ``eager_fp32_ftz``: the same with denormals flushed to zero (``torch.set_flush_denormal``).
* ``channels_last``, ``fused_fp32``, ``bf16_autocast``, ``compile_inductor`` (inductor, freezing):
  PyTorch variants, each with denormals flushed.
* ``onnx_default`` / ``onnx_tuned``: the sampler graph in onnxruntime with its default session and
  with :func:`cdal_fast.runtime.ort_options.tuned_session_options`; ``onnx_int8_dynamic``: that graph with
  dynamically quantised int8 convolutions and matmuls; ``onnx_int8_static``: statically quantised
  (QDQ) int8 convolutions, activation ranges calibrated on 3 training crops.
* ``auto``: ``build_sampler(..., "auto")``, i.e. what ``cdal-fast segment`` runs with no speed flags.

The paths are interleaved (authors, A, B, ..., authors, A, B, ...), one tile per path per round,
so that load from other processes hits all of them alike; each round's ratio is the authors' time
in that round over the path's. Mask Dice is against ``eager_fp32`` on the same tile and noise. The
load average is recorded per round. Writes ``cpu_tile.json`` and ``cpu_tile.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cdal_fast.datasets import find_pairs, read_split, resolve_2d_root
from cdal_fast.metrics import dice_iou
from cdal_fast.models import load_model
from cdal_fast.network.config import ModelConfig
from cdal_fast.runtime.backend_choice import resolve_backend
from cdal_fast.runtime.backends import BackendError, build_sampler
from cdal_fast.runtime.onnx_cache import cached_onnx
from cdal_fast.sampling.imageio import read_image, resize_image
from cdal_fast.sampling.preprocess import match_channels, normalise, to_chw_float
from cdal_fast.sampling.sampler import SamplerNoise, decode_mask, draw_noise, generators_from_seed

try:
    from bench.authors_protocol import authors_tile
    from bench.common import write_results
except ImportError:  # run as a script
    from authors_protocol import authors_tile
    from common import write_results

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "monuseg"
PROTOCOL_SIZE = 512  # MoNuSeg tiles are resized to 512 and cut into four 256 quarters (spec section 8)
BASELINE = "authors"
REFERENCE = "eager_fp32"
REFERENCE_TTA = "eager_fp32_tta"
QUICK_SKIP = ("compile_inductor", "onnx_int8_dynamic", "onnx_int8_static")  # minutes of compiling / quantising
CALIBRATION_CROPS = 3  # static int8: train crops whose activation ranges set the quantisation scales
CALIBRATION_SEED = 100  # their noise, apart from the measured crops' seeds 0..tiles-1
TileFn = Callable[[torch.Tensor, SamplerNoise], torch.Tensor]


def monuseg_val_crops(data: Path, cfg: ModelConfig, count: int, split: str = "val") -> list[tuple[str, torch.Tensor]]:
    """``count`` normalised (1, 3, 256, 256) crops: quarter ``i % 4`` of the i-th tile of ``split`` at 512."""
    root = resolve_2d_root(data)
    pairs = find_pairs(root, read_split(root, split))
    if count > len(pairs):
        raise ValueError(f"{root}: {count} crops asked for, the {split} split has {len(pairs)} tiles")
    size = cfg.image_size
    crops = []
    for i, (name, image_path, _) in enumerate(pairs[:count]):
        img = resize_image(match_channels(to_chw_float(read_image(image_path)), cfg.img_channels), PROTOCOL_SIZE)
        q = i % 4
        r, c = (q // 2) * size, (q % 2) * size
        crops.append((f"{name}[q{q}]", normalise(img[:, r:r + size, c:c + size], cfg)))
    return crops


@dataclass
class BenchPath:
    """One way of segmenting a tile: how to build it and whether denormals are flushed while it runs."""

    label: str
    build: Callable[[], TileFn]
    flush_denormal: bool = True
    tta: bool = False  # compared with the eager float32 sampler with the same test-time augmentation


def _sampler_fn(sampler: Callable, memory_format: torch.memory_format | None = None,
                autocast: torch.dtype | None = None) -> TileFn:
    def run(image: torch.Tensor, n: SamplerNoise) -> torch.Tensor:
        img = image.contiguous(memory_format=memory_format) if memory_format is not None else image
        with torch.inference_mode(), torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            return sampler(img, n.x_init, n.z, n.post)[0].float()
    return run


def _quantised_onnx(src: Path, out_dir: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = out_dir / f"{src.stem}-int8-dynamic.onnx"
    if not out.is_file():
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "MatMul"])
    return out


def _static_quantised_onnx(src: Path, out_dir: Path, calibration: list[dict[str, np.ndarray]]) -> Path:
    """Static int8 (QDQ): per-channel int8 convolution weights, uint8 activations whose ranges come
    from running the float32 graph on ``calibration`` feeds (training crops, not the measured ones)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    prepared, out = out_dir / f"{src.stem}-prepared.onnx", out_dir / f"{src.stem}-int8-static.onnx"
    if not out.is_file():
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), Feeds(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"])
    return out


def calibration_feeds(data: Path, cfg: ModelConfig, count: int = CALIBRATION_CROPS) -> list[dict[str, np.ndarray]]:
    """Sampler-graph inputs for static quantisation: ``count`` crops of the *train* split, own noise."""
    feeds = []
    for i, (_, crop) in enumerate(monuseg_val_crops(data, cfg, count, split="train")):
        n = draw_noise(cfg.num_steps, cfg.votes, cfg.mask_channels, cfg.nz, cfg.image_size, cfg.image_size,
                       generators_from_seed(CALIBRATION_SEED + i, 1))
        feeds.append({k: t.float().numpy() for k, t in
                      (("image", crop), ("x_init", n.x_init), ("z", n.z), ("post", n.post))})
    return feeds


def make_paths(bundle, work: Path, data: Path = DEFAULT_DATA,  # noqa: ANN001  (a ModelBundle)
               student: Path | None = None) -> dict[str, BenchPath]:
    """Every CPU path, built lazily (a path whose pieces are missing is skipped, with the reason)."""
    gen, sha = bundle.generator.eval(), bundle.content_sha256
    tta = bool(getattr(bundle.config, "tta", False))  # what segment does with the model by default

    def onnx_path() -> Path:
        return cached_onnx(gen, None, None, sha)

    def onnx(options: str, quantised: str = "") -> TileFn:
        from cdal_fast.runtime.onnx_tensorrt import OnnxSampler
        from cdal_fast.runtime.ort_options import default_session_options, tuned_session_options

        if quantised == "static":
            path = _static_quantised_onnx(onnx_path(), work, calibration_feeds(data, bundle.config))
        else:
            path = _quantised_onnx(onnx_path(), work) if quantised else onnx_path()
        so = default_session_options() if options == "default" else tuned_session_options()
        return _sampler_fn(OnnxSampler(path, gen if not quantised else None, sha, session_options=so))

    def channels_last() -> TileFn:
        g = copy.deepcopy(gen).to(memory_format=torch.channels_last)
        return _sampler_fn(build_sampler(g, None, None, "eager"), memory_format=torch.channels_last)

    def compiled() -> TileFn:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        return _sampler_fn(torch.compile(build_sampler(gen, None, None, "eager"), dynamic=False))

    return {
        BASELINE: BenchPath("original protocol (votes one by one, batch 1, encoder in every forward)",
                            lambda: lambda img, n: authors_tile(gen, img, n.x_init, n.z, n.post)[0], False),
        REFERENCE: BenchPath("eager float32, as before this change", lambda: _sampler_fn(
            build_sampler(gen, None, None, "eager")), False),
        "eager_fp32_ftz": BenchPath("eager float32, denormals flushed", lambda: _sampler_fn(
            build_sampler(gen, None, None, "eager"))),
        "channels_last": BenchPath("eager float32, channels-last", channels_last),
        "fused_fp32": BenchPath("fused C++ ops, float32", lambda: _sampler_fn(build_sampler(gen, None, None, "fused"))),
        "bf16_autocast": BenchPath("eager, bf16 autocast", lambda: _sampler_fn(
            build_sampler(gen, None, None, "eager"), autocast=torch.bfloat16)),
        "compile_inductor": BenchPath("torch.compile inductor, freezing", compiled),
        "onnx_default": BenchPath("onnxruntime float32, default session", lambda: onnx("default")),
        "onnx_tuned": BenchPath("onnxruntime float32, tuned session", lambda: onnx("tuned")),
        "onnx_int8_dynamic": BenchPath("onnxruntime int8 dynamic quantisation", lambda: onnx("tuned", "dynamic")),
        "onnx_int8_static": BenchPath("onnxruntime int8 static quantisation (QDQ, calibrated on 3 train crops)",
                                      lambda: onnx("tuned", "static")),
        "onnx_int8_tta": BenchPath("--backend onnx_int8 (static int8, bundled calibration tiles), with the model's TTA",
                                   lambda: _sampler_fn(build_sampler(gen, None, None, "onnx_int8", weights_sha256=sha,
                                                                     tta=tta)), tta=tta),
        "bf16_autocast_tta": BenchPath("eager, bf16 autocast, with the model's TTA", lambda: _sampler_fn(
            build_sampler(gen, None, None, "eager", tta=tta), autocast=torch.bfloat16), tta=tta),
        "onnx_tuned_tta": BenchPath("onnxruntime float32, tuned session, with the model's TTA", lambda: _sampler_fn(
            build_sampler(gen, None, None, "onnx", weights_sha256=sha, tta=tta)), tta=tta),
        "student": BenchPath(f"one-pass student {student} (--backend auto; Dice column: against the teacher's "
                             "eager float32)", lambda: _student_fn(student)),
        REFERENCE_TTA: BenchPath("eager float32 with test-time augmentation (reference for TTA paths)",
                                 lambda: _sampler_fn(build_sampler(gen, None, None, "eager", tta=True)), False, True),
        "auto": BenchPath(f"segment default: --backend auto -> {resolve_backend('cpu').backend}"
                          + (", TTA (the model's default)" if tta else ""), lambda: _sampler_fn(
            build_sampler(gen, None, None, "auto", weights_sha256=sha, tta=tta)), tta=tta),
    }


def _student_fn(student: Path | None) -> TileFn:
    """A one-pass model as segment runs it (``--backend auto``): one forward, the noise ignored."""
    if student is None:
        raise ValueError("no --student weights given")
    bundle = load_model(student)
    return _sampler_fn(build_sampler(bundle.generator, 1, 1, "auto", weights_sha256=bundle.content_sha256))


def _spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def run(args: argparse.Namespace) -> None:
    bundle = load_model(args.weights)
    cfg = bundle.config
    crops = monuseg_val_crops(args.data, cfg, args.tiles)
    noises = [draw_noise(cfg.num_steps, cfg.votes, cfg.mask_channels, cfg.nz, cfg.image_size, cfg.image_size,
                         generators_from_seed(i, 1)) for i in range(len(crops))]
    with tempfile.TemporaryDirectory() as tmp:
        all_paths = make_paths(bundle, Path(tmp), args.data, args.student)
        names = [n for n in (args.paths or all_paths) if not (args.quick and not args.paths and n in QUICK_SKIP)]
        required = [BASELINE, REFERENCE] + ([REFERENCE_TTA] if any(all_paths[n].tta for n in names) else [])
        names = [*required, *(n for n in names if n not in required)]
        fns: dict[str, TileFn] = {}
        rows: dict[str, dict] = {}
        for name in names:  # build + one warm-up call (compilation, export, session creation)
            path = all_paths[name]
            rows[name] = {"path": name, "what": path.label}
            t0 = time.perf_counter()
            try:
                torch.set_flush_denormal(path.flush_denormal)
                fn = path.build()
                fn(crops[0][1], noises[0])
            except (BackendError, RuntimeError, ImportError, ValueError) as exc:
                rows[name]["skipped"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                print(name, rows[name]["skipped"], flush=True)
                continue
            finally:
                torch.set_flush_denormal(False)
            fns[name] = fn
            rows[name]["build_s"] = time.perf_counter() - t0
            print(f"built {name} in {rows[name]['build_s']:.1f} s", flush=True)
        times: dict[str, list[float]] = {n: [] for n in fns}
        probs: dict[tuple[str, int], torch.Tensor] = {}
        loads = []
        for r in range(args.repeats):
            ci = r % len(crops)
            loads.append(os.getloadavg()[0])
            for name, fn in fns.items():
                torch.set_flush_denormal(all_paths[name].flush_denormal)
                t0 = time.perf_counter()
                prob = fn(crops[ci][1], noises[ci])
                times[name].append(time.perf_counter() - t0)
                torch.set_flush_denormal(False)
                probs.setdefault((name, ci), prob)
            print(f"round {r + 1}/{args.repeats} (load {loads[-1]:.2f}): "
                  + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), flush=True)
            summarise(rows, times, probs, min(len(crops), r + 1), {n for n in fns if all_paths[n].tta}, cfg)
            write_table(list(rows.values()), loads, cfg, crops, args)  # after every round: a cut run keeps a table


def summarise(rows: dict[str, dict], times: dict[str, list[float]], probs: dict[tuple[str, int], torch.Tensor],
              crops_done: int, tta_paths: set[str] = frozenset(), cfg: ModelConfig | None = None) -> None:
    """Per path: s/tile (median, min, max), ratio to the baseline within each round, Dice vs the reference
    (eager float32 with the same test-time augmentation setting) of the masks at ``cfg``'s threshold."""
    for name, ts in times.items():
        reference = REFERENCE_TTA if name in tta_paths else REFERENCE
        med, lo, hi = _spread(ts)
        ratios = [b / t for b, t in zip(times[BASELINE], ts)]
        dices, diffs = [], []
        for ci in range(crops_done):
            ref, got = probs[(reference, ci)], probs[(name, ci)]
            dices.append(dice_iou(decode_mask(got, cfg) > 0, decode_mask(ref, cfg) > 0)[0])  # at the model's threshold
            diffs.append(float((got - ref).abs().max()))
        rmed, rlo, rhi = _spread(ratios)
        rows[name].update({"s_per_tile": med, "s_min": lo, "s_max": hi, "spread_pct": 100 * (hi - lo) / med,
                           "x_vs_authors": rmed, "x_min": rlo, "x_max": rhi, "dice_min": min(dices),
                           "max_abs_prob_diff": max(diffs), "rounds": len(ts), "times_s": ts})


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def cpu_flags() -> str:
    """The vector extensions that decide which kernels run (AVX2/FMA, AVX-512, BF16, VNNI, AMX)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in wanted if f in have) or "none of " + " ".join(wanted)
    except OSError:
        pass
    return "unknown"


COLUMNS = ["path", "what", "s_per_tile", "s_min", "s_max", "spread_pct", "rounds", "x_vs_authors", "x_min", "x_max",
           "dice_min", "max_abs_prob_diff", "build_s", "skipped"]


def write_table(rows: list[dict], loads: list[float], cfg: ModelConfig, crops: list, args: argparse.Namespace) -> None:
    note = (f"CPU: {cpu_name()} ({os.cpu_count()} logical cores; {cpu_flags()}), torch threads "
            f"{torch.get_num_threads()}. Model {cfg.name}, T {cfg.num_steps}, V {cfg.votes}, {cfg.image_size}x"
            f"{cfg.image_size} tiles: {', '.join(n for n, _ in crops)}. {args.repeats} interleaved rounds; "
            f"1-min load average per round {min(loads):.2f}..{max(loads):.2f}. x_vs_authors: median over rounds "
            f"of the baseline's time in that round / the path's (x_min..x_max their range); dice_min: the lowest "
            f"mask Dice vs eager_fp32 (eager_fp32_tta for paths with test-time augmentation) on the same tile "
            f"and noise.")
    write_results(args.name, rows, COLUMNS, args.out, extra={"load_average_per_round": loads}, note=note)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=None, help="default: the shipped MoNuSeg model")
    ap.add_argument("--student", type=Path, default=None, help="a one-pass model for the 'student' path")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MoNuSeg folder with split.json (val tiles)")
    ap.add_argument("--tiles", type=int, default=None, help="validation crops (default 4; --quick 2)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5; --quick 2)")
    ap.add_argument("--paths", nargs="+", default=None, help="subset of paths (authors and eager_fp32 always run)")
    ap.add_argument("--quick", action="store_true", help=f"2 rounds on 2 tiles, without {', '.join(QUICK_SKIP)}")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--name", default="cpu_tile", help="result file name (a CPU of another kind: another name)")
    args = ap.parse_args()
    args.tiles = args.tiles or (2 if args.quick else 4)
    args.repeats = args.repeats or (2 if args.quick else 5)
    run(args)


if __name__ == "__main__":
    main()
