"""The GPU kit's helpers that need the project's environment (torch, numpy, tifffile), each run by
``scripts/gpu_kit.py`` as a subprocess of its own, so a missing package or a crash is one step's
failure, not the kit's:

    facts                         machine, driver, torch/CUDA/cuDNN versions, TF32 flags, CPU flags
    imports REQ OPT [--table F]   import each module; exit 1 when a required one is missing
    registration KEYS             the cdal ops' dispatch keys must include KEYS (e.g. CPU,CUDA,Meta)
    error-path DEVICES            an op given bad arguments raises on each device (e.g. cpu,cuda)
    cuda-includes                 the include folders of torch's CUDA wheels (CPATH for the build)
    slide SRC DST SIDE MPP        a SIDE x SIDE pyramidal OME-TIFF at MPP um/px mosaicked from SRC
    tiny-weights DST              seeded tiny-preset weights (the dry run's model)
    segment-report SEG PREFIX     per run: tiles, sampler seconds; mask Dice of fast vs reference runs
"""

from __future__ import annotations

import importlib
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# fast run -> the reference run whose masks it must match (same slide, same seed, eager float32)
PAIRS = {"sample_fast": "sample_ref", "slide_fast": "slide_ref", "slide_fast_b32": "slide_ref"}


def facts() -> int:
    import torch

    sys.path.insert(0, str(REPO))
    from bench.common import cpu_model_and_flags

    if shutil.which("nvidia-smi"):
        print(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                              "--format=csv"], capture_output=True, text=True).stdout.strip())
    model, flags = cpu_model_and_flags()
    print(f"python {platform.python_version()} at {sys.executable}")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    print(f"CPU {model} ({' '.join(flags)}), {torch.get_num_threads()} torch threads")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"GPU {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
        print(f"TF32: cuDNN {torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32}")
    else:
        print("no CUDA device")
    return 0


def imports(required: str, optional: str, table: str | None) -> int:
    rows, missing = [], []
    for kind, names in (("required", required), ("optional", optional)):
        for name in filter(None, names.split(",")):
            try:
                mod = importlib.import_module(name)
                where = str(Path(getattr(mod, "__file__", "") or "?").parent)
                rows.append(f"| {name} | {kind} | {getattr(mod, '__version__', '?')} | {where} |")
            except Exception as exc:  # noqa: BLE001 (any import failure is what this reports)
                rows.append(f"| {name} | {kind} | MISSING | {type(exc).__name__}: {str(exc)[:120]} |")
                if kind == "required":
                    missing.append(name)
    text = "\n".join(["| module | kind | version | from |", "|---|---|---|---|", *rows])
    text += f"\n\nrequired modules missing: {', '.join(missing) or 'none'}\n"
    print(text)
    if table:
        Path(table).write_text(text)
    return 1 if missing else 0


def registration(expected: str) -> int:
    import cdal_fast._C  # noqa: F401  (registers torch.ops.cdal.*)
    import torch

    ok = True
    for op in ("adagn_silu", "self_attention"):
        dump = torch._C._dispatch_dump(f"cdal::{op}")
        keys = sorted({line.split(":")[0] for line in dump.splitlines() if ": registered at" in line})
        lacking = sorted(set(expected.split(",")) - set(keys))
        print(f"cdal::{op}: {keys}" + (f"  LACKS {lacking}" if lacking else ""))
        ok &= not lacking
    return 0 if ok else 1


def error_path(devices: str) -> int:
    """An op given bad arguments must raise, not kill the process: a library linked against its own
    copy of libstdc++ segfaults while formatting the error (seen on an H200 image whose ``c++`` was
    /opt/gcc/bin/g++). Exit 0 when every device raised the expected RuntimeError."""
    import cdal_fast._C  # noqa: F401
    import torch

    ok = True
    for device in devices.split(","):
        x = torch.zeros(1, 3, 4, 4, device=device)
        gamma = torch.ones(1, 3, device=device)
        try:
            torch.ops.cdal.adagn_silu(x, gamma, gamma, None, 2, 1e-6)  # 3 channels in 2 groups: refused
            print(f"{device}: no error raised")
            ok = False
        except RuntimeError as exc:
            raised = "divisible" in str(exc)
            print(f"{device}: RuntimeError raised{'' if raised else ' (unexpected message)'}: {str(exc)[:120]}")
            ok &= raised
    return 0 if ok else 1


def cuda_includes() -> int:
    import torch

    site = Path(torch.__file__).resolve().parents[1]
    dirs = sorted({str(p) for p in (site / "nvidia").glob("**/include") if p.is_dir()})
    print(":".join(dirs))
    return 0


def slide(src: str, dst: str, side: str, mpp: str) -> int:
    """Mirror-tile the bundled sample (0.5 um/px), resampled to ``mpp``, into a side x side slide."""
    import numpy as np
    import tifffile
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from tests.slides import write_ome_pyramid

    rgb = tifffile.imread(src)
    scale = 0.5 / float(mpp)
    img = Image.fromarray(rgb).resize((round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)), Image.BILINEAR)
    tile = np.asarray(img)
    n = int(side)
    block = np.concatenate([tile, tile[::-1]], 0)
    block = np.concatenate([block, block[:, ::-1]], 1)
    reps = (-(-n // block.shape[0]), -(-n // block.shape[1]), 1)
    write_ome_pyramid(Path(dst), np.ascontiguousarray(np.tile(block, reps)[:n, :n]), float(mpp), levels=3)
    print(f"{dst}: {n} x {n} px at {mpp} um/px from {src}")
    return 0


def tiny_weights(dst: str) -> int:
    import torch

    sys.path.insert(0, str(REPO))
    from cdal_fast.network.config import get_preset
    from cdal_fast.network.generator import Generator
    from cdal_fast.weights import save_weights
    from tests.conftest import perturbed

    torch.manual_seed(0)
    save_weights(dst, perturbed(Generator(get_preset("tiny"))).eval(), dtype=torch.float32)
    print(f"tiny weights at {dst}")
    return 0


def _mask(folder: Path):
    import tifffile

    found = sorted(folder.glob("*.mask.ome.tif"))
    return tifffile.imread(found[0]) > 127 if found else None


def segment_report(seg: str, prefix: str) -> int:
    """Per run: tiles, sampler and total seconds (the slide JSON), and the masks' Dice vs the reference."""
    rows = []
    out = Path(prefix)
    for run in sorted(p for p in Path(seg).iterdir() if p.is_dir()):
        summaries = [p for p in run.glob("*.json") if not p.name.startswith("run_summary")]
        keep = out.parent / "segment_runs" / run.name
        keep.mkdir(parents=True, exist_ok=True)
        for p in [*run.glob("*.json"), *run.glob("*.overlay.png")]:
            shutil.copy(p, keep / p.name)
        if not summaries:
            rows.append({"run": run.name, "error": "no slide summary (the run failed: see its log)"})
            continue
        s = json.loads(summaries[0].read_text())
        model = s.get("model", {})
        row = {"run": run.name, "tiles": s.get("tiles_sampled"), "sampler_s": s.get("sampler_seconds"),
               "total_s": s.get("seconds"), "backend": model.get("backend"), "dtype": model.get("dtype"),
               "batch": s.get("options", {}).get("batch_size"), "tta": model.get("tta"),
               "nuclei": s.get("nuclei_count")}
        ref = PAIRS.get(run.name)
        if ref and (Path(seg) / ref).is_dir():
            a, b = _mask(run), _mask(Path(seg) / ref)
            if a is not None and b is not None and a.shape == b.shape:
                row["dice_vs_ref"] = float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))
        rows.append(row)
    cols = ["run", "tiles", "sampler_s", "total_s", "backend", "dtype", "batch", "tta", "nuclei", "dice_vs_ref",
            "error"]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    text = "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
                      *("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows)]) + "\n"
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


COMMANDS = {"facts": facts, "imports": imports, "registration": registration, "error-path": error_path,
            "cuda-includes": cuda_includes,
            "slide": slide, "tiny-weights": tiny_weights, "segment-report": segment_report}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        return 2
    name, args = argv[0], argv[1:]
    if name == "imports":
        table = args[args.index("--table") + 1] if "--table" in args else None
        return imports(args[0], args[1], table)
    return COMMANDS[name](*args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
