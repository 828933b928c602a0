"""Output names, completion markers and small writers shared by the slide, radiograph and volume jobs.

An input is done when its JSON summary exists with ``"complete": true`` (and, for slides, the mask
and every other output the options ask for exist: the nucleus GeoJSON / CSV / label raster); the
summary is always written last, through :func:`cdal_fast.atomic.atomic_output`, so an interrupted
run never leaves anything that looks complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_output
from .readers import SLIDE_SUFFIXES, SMALL_SUFFIXES

__all__ = ["OME_SUFFIXES", "INPUT_SUFFIXES", "slide_stem", "NameCollisionError", "output_names",
           "is_small_image", "output_paths", "required_outputs", "is_complete", "finished_summary",
           "complete_summary",
           "write_png", "write_summary"]

OME_SUFFIXES = (".ome.tif", ".ome.tiff")
INPUT_SUFFIXES = SLIDE_SUFFIXES + (".nii", ".nii.gz")  # every format suffix an input name may end with
RESERVED_NAME = "run_summary"  # OUT/run_summary.json is the batch's own summary


def slide_stem(path: Path) -> str:
    """Output name stem: the file name without its one known format suffix, so every other dot stays.

    ``a.ome.tif`` -> ``a``, ``s.v1.ome.tif`` -> ``s.v1``, ``b.svs`` -> ``b``, ``v.nii.gz`` -> ``v``; a
    DICOM folder keeps its name. (Cutting at the first dot mapped ``s.v1`` and ``s.v2`` to one name.)
    """
    lower = path.name.lower()
    for suffix in sorted(INPUT_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return path.name[: -len(suffix)]
    return path.name if path.is_dir() else path.stem


class NameCollisionError(ValueError):
    """Two inputs would write the same outputs; raised before any work starts."""


def output_names(files: list[Path], roots: list[Path] | None = None) -> dict[Path, str]:
    """Each input's output name under ``--out``: its stem, below its folder relative to the named root.

    ``roots`` are the folders the user named (recursive runs keep ``a/x.svs`` and ``b/x.svs`` apart as
    ``a/x`` and ``b/x``); a file named directly, or outside every root, gets its bare stem. Names are
    compared case-insensitively (macOS and Windows volumes are); two inputs with one name (``x.tif`` and
    ``x.svs`` side by side, or two named files ``p/x.svs`` and ``q/x.svs``) raise
    :class:`NameCollisionError` listing every clash, as does the reserved name ``run_summary``.
    """
    names: dict[Path, str] = {}
    owners: dict[str, list[Path]] = {}
    resolved_roots = [r.resolve() for r in (roots or []) if r.is_dir()]
    for f in files:
        rel_dir = Path()
        parent = f.parent.resolve()  # the entry's own folder (a link may point anywhere, or loop)
        for root in sorted(resolved_roots, key=lambda r: len(r.parts), reverse=True):
            if parent == root or root in parent.parents:
                rel_dir = parent.relative_to(root)
                break
        name = (rel_dir / slide_stem(f)).as_posix()
        names[f] = name
        owners.setdefault(name.lower(), []).append(f)
    clashes = [paths for paths in owners.values() if len(paths) > 1]
    problems = [" and ".join(str(p) for p in paths) + f" -> {names[paths[0]]!r}" for paths in clashes]
    if RESERVED_NAME in owners:
        problems.append(f"{owners[RESERVED_NAME][0]}: the name {RESERVED_NAME!r} is the run summary's")
    if problems:
        raise NameCollisionError(
            "inputs that would overwrite each other's outputs (rename them or run them into separate --out "
            "folders): " + "; ".join(problems))
    return names


def is_small_image(path: Path) -> bool:
    """PNG/JPEG inputs get PNG outputs; everything else pyramidal OME-TIFFs."""
    return path.name.lower().endswith(SMALL_SUFFIXES)


def output_paths(out_dir: Path, stem: str, small: bool, layout: str = "ome") -> dict[str, Path]:
    """Every file a slide job may write, by role (mask, prob, uncertainty, overlay, tissue, QC heatmaps, nuclei,
    labels, summary).

    ``layout`` "openslide" writes plain pyramidal TIFFs (``.tif``): they carry no OME metadata. The
    nucleus label raster is uint32, which PNG cannot hold: a TIFF pyramid for PNG/JPEG inputs too.
    The nucleus file names match :class:`cdal_fast.nuclei.NucleiWriters` (tests check both).
    """
    ext = ".png" if small else (".ome.tif" if layout == "ome" else ".tif")
    tif = ".ome.tif" if layout == "ome" else ".tif"
    return {
        "nuclei_geojson": out_dir / f"{stem}.nuclei.geojson",
        "nuclei_geojson_gz": out_dir / f"{stem}.nuclei.geojson.gz",
        "nuclei_csv": out_dir / f"{stem}.nuclei.csv",
        "nuclei_parquet": out_dir / f"{stem}.nuclei.parquet",
        "labels": out_dir / f"{stem}.labels{tif}",
        "mask": out_dir / f"{stem}.mask{ext}",
        "prob": out_dir / f"{stem}.prob{ext}",
        "uncertainty": out_dir / f"{stem}.uncertainty{ext}",
        "overlay": out_dir / f"{stem}.overlay.png",
        "tissue": out_dir / f"{stem}.tissue.png",
        "qc_density": out_dir / f"{stem}.qc_density.png",
        "qc_uncertainty": out_dir / f"{stem}.qc_uncertainty.png",
        "summary": out_dir / f"{stem}.json",
    }


def required_outputs(opts: Any) -> tuple[str, ...]:
    """Roles (keys of :func:`output_paths`) that must exist for a slide run with ``opts`` (SegmentOptions)
    to count as complete: the mask, the probability and uncertainty maps when asked for, and the
    nucleus files unless turned off. (The tissue thumbnail is not required: it is a diagnostic, and
    slides without tissue detection never write it.)"""
    roles = ["mask"]
    if getattr(opts, "save_prob", False):
        roles.append("prob")
    if getattr(opts, "save_uncertainty", False):
        roles.append("uncertainty")
    if getattr(opts, "nuclei", False):
        if opts.nuclei_geojson:
            roles.append("nuclei_geojson_gz" if opts.nuclei_gzip else "nuclei_geojson")
        if opts.nuclei_csv:
            roles.append("nuclei_csv")
        if getattr(opts, "nuclei_parquet", False):
            roles.append("nuclei_parquet")
        if opts.save_labels:
            roles.append("labels")
    return tuple(roles)


def finished_summary(out_dir: Path, stem: str, small: bool, layout: str = "ome",
                     required: tuple[str, ...] = ("mask",)) -> dict[str, Any] | None:
    """A slide is done when its ``required`` outputs exist and its summary says complete: that
    summary (read once; the resume check compares the settings it recorded), else None."""
    paths = output_paths(out_dir, stem, small, layout)
    return complete_summary(paths["summary"]) if all(paths[r].is_file() for r in required) else None


def is_complete(out_dir: Path, stem: str, small: bool, layout: str = "ome",
                required: tuple[str, ...] = ("mask",)) -> bool:
    return finished_summary(out_dir, stem, small, layout, required) is not None


def complete_summary(path: Path) -> dict[str, Any] | None:
    """The summary at ``path`` if it exists and says complete, else None."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) and summary.get("complete") else None


def write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    with atomic_output(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Written last: its ``complete`` flag is what marks an input as done."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
