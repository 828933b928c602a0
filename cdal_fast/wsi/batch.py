"""Run ``segment_slide`` over many inputs: discovery, skip-if-done, per-file errors, a run summary."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import ModelConfig
from ..evaluate import PatchRunner
from .dicom import is_dicom_folder
from .other_tasks import VOLUME_SUFFIXES, is_volume, segment_radiograph, segment_volume, volume_stem
from .pipeline import (
    SegmentOptions,
    is_complete,
    is_small_image,
    segment_slide,
    slide_stem,
    summary_complete,
    write_summary,
)
from .readers import DICOM_SUFFIXES, SLIDE_SUFFIXES, SlideError

__all__ = ["find_inputs", "RunReport", "segment_all"]


def find_inputs(inputs: list[Path], recursive: bool = False, pattern: str | None = None) -> list[Path]:
    """Files named directly, plus slide-like files inside named folders (sorted, de-duplicated).

    A DICOM WSI is a folder of instances: a named folder holding DICOM files is one input, and a
    ``.dcm`` file found while scanning stands for its folder (so a slide's levels are one input).
    """
    found: list[Path] = []
    for p in inputs:
        if p.is_dir() and is_dicom_folder(p) and not any(
                f.name.lower().endswith(SLIDE_SUFFIXES) and not f.name.lower().endswith(DICOM_SUFFIXES)
                for f in p.iterdir()):
            found.append(p)  # a slide's DICOM instances (suffix or not); folders with other slides are scanned
        elif p.is_dir():
            it = (p.rglob(pattern or "*") if recursive else p.glob(pattern or "*"))
            found += [f.parent if f.name.lower().endswith(DICOM_SUFFIXES) else f for f in it
                      if f.is_file() and f.name.lower().endswith(SLIDE_SUFFIXES + VOLUME_SUFFIXES)
                      and not f.name.startswith(".")]
        else:
            found.append(p)
    seen, out = set(), []
    for f in sorted(found):
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


@dataclass
class RunReport:
    done: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        tiles = sum(d["tiles_sampled"] for d in self.done)
        return {"processed": len(self.done), "skipped_complete": self.skipped,
                "failed": [{"file": f, "error": e} for f, e in self.failed], "seconds": self.seconds,
                "tiles": tiles, "tiles_per_second": tiles / self.seconds if self.seconds else 0.0}


def _done(out_dir: Path, f: Path, task: str, layout: str = "ome") -> bool:
    if task == "monuseg":
        return is_complete(out_dir, slide_stem(f), is_small_image(f), layout)
    return summary_complete(out_dir / f"{volume_stem(f) if is_volume(f) else f.stem}.json")


def segment_all(files: list[Path], out_dir: Path, sampler: torch.nn.Module, cfg: ModelConfig, opts: SegmentOptions,
                device: torch.device, dtype: torch.dtype, model_info: dict, echo=print,
                show_progress: bool = True, task: str = "monuseg") -> RunReport:
    """Segment ``files`` for ``task``: slides/images (monuseg), radiographs (cxr), volumes (hippocampus)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = RunReport()
    t0 = time.perf_counter()
    runner = PatchRunner(sampler, device, dtype, batch_size=max(opts.batch_size, 1), seed=opts.seed)
    for f in files:
        if not opts.overwrite and _done(out_dir, f, task, opts.pyramid_layout):
            report.skipped.append(str(f))
            echo(f"skip  {f} (already done; --overwrite to redo)")
            continue
        bar = tqdm(desc=f.name, unit="tile", disable=not show_progress, leave=False, dynamic_ncols=True)
        try:
            if task == "cxr":
                summary = segment_radiograph(f, out_dir, runner, cfg, model_info, progress=bar.update)
            elif task == "hippocampus":
                if not is_volume(f):
                    raise SlideError(f"{f}: the hippocampus model segments NIfTI volumes (.nii, .nii.gz)")
                summary = segment_volume(f, out_dir, runner, cfg, model_info, progress=bar.update)
            else:
                summary = segment_slide(f, out_dir, sampler, cfg, opts, device, dtype, model_info,
                                        progress=bar.update)
        except (SlideError, OSError, ValueError) as exc:
            report.failed.append((str(f), str(exc)))
            echo(f"FAIL  {f}: {exc}")
            continue
        finally:
            bar.close()
        report.done.append(summary)
        for warning in summary.get("warnings") or []:
            echo(f"warn  {f}: {warning}")
        detail = (f"objects {summary['object_fraction']:.3f}, " if "object_fraction" in summary else "")
        echo(f"done  {f}: {detail}{summary['seconds']:.1f} s")
    report.seconds = time.perf_counter() - t0
    write_summary(out_dir / "run_summary.json", report.to_dict())
    return report
