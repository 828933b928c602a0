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
from .readers import SMALL_SUFFIXES

__all__ = ["OME_SUFFIXES", "slide_stem", "is_small_image", "output_paths", "required_outputs", "is_complete",
           "summary_complete", "write_png", "write_summary"]

OME_SUFFIXES = (".ome.tif", ".ome.tiff")


def slide_stem(path: Path) -> str:
    """Output name stem: ``a.ome.tif`` -> ``a``, ``b.svs`` -> ``b``."""
    return path.name.split(".")[0] if path.name.lower().endswith(OME_SUFFIXES) else path.stem


def is_small_image(path: Path) -> bool:
    """PNG/JPEG inputs get PNG outputs; everything else pyramidal OME-TIFFs."""
    return path.name.lower().endswith(SMALL_SUFFIXES)


def output_paths(out_dir: Path, stem: str, small: bool, layout: str = "ome") -> dict[str, Path]:
    """Every file a slide job may write, by role (mask, prob, uncertainty, overlay, tissue, nuclei, labels,
    summary).

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
        "labels": out_dir / f"{stem}.labels{tif}",
        "mask": out_dir / f"{stem}.mask{ext}",
        "prob": out_dir / f"{stem}.prob{ext}",
        "uncertainty": out_dir / f"{stem}.uncertainty{ext}",
        "overlay": out_dir / f"{stem}.overlay.png",
        "tissue": out_dir / f"{stem}.tissue.png",
        "summary": out_dir / f"{stem}.json",
    }


def required_outputs(opts: Any) -> tuple[str, ...]:
    """Roles (keys of :func:`output_paths`) that must exist for a slide run with ``opts`` (SegmentOptions)
    to count as complete: the mask, and the nucleus files unless turned off."""
    roles = ["mask"]
    if getattr(opts, "nuclei", False):
        if opts.nuclei_geojson:
            roles.append("nuclei_geojson_gz" if opts.nuclei_gzip else "nuclei_geojson")
        if opts.nuclei_csv:
            roles.append("nuclei_csv")
        if opts.save_labels:
            roles.append("labels")
    return tuple(roles)


def is_complete(out_dir: Path, stem: str, small: bool, layout: str = "ome",
                required: tuple[str, ...] = ("mask",)) -> bool:
    """A slide is done when its ``required`` outputs exist and its summary says complete."""
    paths = output_paths(out_dir, stem, small, layout)
    return all(paths[r].is_file() for r in required) and summary_complete(paths["summary"])


def summary_complete(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text()).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


def write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    with atomic_output(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Written last: its ``complete`` flag is what marks an input as done."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
