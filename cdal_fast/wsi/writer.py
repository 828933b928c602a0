"""Streaming writers: pyramidal, tiled, compressed OME-TIFF (BigTIFF) from a disk-backed map.

The map produced by stitching lives on disk at working resolution (``mapfile.MapFile``, read by
row bands). Each pyramid level of the output is generated tile by tile by nearest-neighbour index mapping from that map,
so writing needs memory for one tile at a time whatever the slide size, and level 0 of the output
has exactly the slide's level-0 pixel geometry (so it overlays the slide pixel for pixel).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["PYRAMID_LAYOUTS", "write_pyramid"]

PYRAMID_LAYOUTS = ("ome", "openslide")  # see write_pyramid for which viewer reads which


def _level_shapes(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    shapes = [(height, width)]
    while max(shapes[-1]) > tile:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _tiles(src: np.ndarray, out_h: int, out_w: int, full_h: int, full_w: int, tile: int,
           transform: callable, dtype: np.dtype = np.uint8) -> Iterator[np.ndarray]:
    """Tiles of an (out_h, out_w) level sampled from ``src`` covering a (full_h, full_w) level 0."""
    sh, sw = src.shape[:2]
    for ty in range(0, out_h, tile):
        rows_out = np.arange(ty, min(ty + tile, out_h))
        rows = np.minimum(((rows_out + 0.5) * (full_h / out_h) * (sh / full_h)).astype(np.int64), sh - 1)
        band = np.asarray(src[rows.min():rows.max() + 1])
        band = band[rows - rows.min()]
        for tx in range(0, out_w, tile):
            cols_out = np.arange(tx, min(tx + tile, out_w))
            cols = np.minimum(((cols_out + 0.5) * (full_w / out_w) * (sw / full_w)).astype(np.int64), sw - 1)
            block = np.zeros((tile, tile) + src.shape[2:], dtype=dtype)
            block[: len(rows), : len(cols)] = transform(band[:, cols])
            yield block


def write_pyramid(path: Path, src: np.ndarray, height: int, width: int, mpp: float | None,
                  transform: callable = lambda a: a, tile: int = 512, compression: str = "zlib",
                  description: str = "", layout: str = "ome", dtype: np.dtype = np.uint8,
                  uuid: str | None = None) -> None:
    """Write ``transform(src)`` resampled to (height, width) as a pyramidal TIFF at ``path``.

    ``mpp`` is the resolution of level 0 (um/px); each level halves the previous one. ``layout``:
    "ome" (OME-TIFF, reduced levels as SubIFDs: QuPath/Bio-Formats, tifffile, napari) or "openslide"
    (plain BigTIFF, every level a top-level tiled IFD: OpenSlide's generic-tiff reader and the viewers
    built on it see all levels; OpenSlide treats SubIFDs as absent and would see one level).
    ``dtype`` is the stored sample type (uint8 maps; uint32 for nucleus instance labels, whose
    nearest-neighbour levels keep every label an existing id).
    ``uuid``: the OME file UUID; pass one derived from the job so that reruns and distributed runs
    write byte-identical files (tifffile otherwise draws a time-based one per file).
    """
    import tifffile

    if layout not in PYRAMID_LAYOUTS:
        raise ValueError(f"pyramid layout must be one of {', '.join(PYRAMID_LAYOUTS)}, got {layout!r}")
    shapes = _level_shapes(height, width, tile)
    ome = layout == "ome"
    meta: dict = {"axes": "YX", "Description": description}
    if uuid:
        meta["UUID"] = f"urn:uuid:{uuid}"
    if mpp and ome:
        meta.update({"PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp,
                     "PhysicalSizeYUnit": "µm"})
    with tifffile.TiffWriter(path, bigtiff=True, ome=ome) as tw:
        for level, (h, w) in enumerate(shapes):
            res: dict = {}
            if mpp:
                # level pixel size = level-0 size x the level's actual downsample (odd sizes round up)
                sx, sy = mpp * width / w, mpp * height / h
                res = {"resolution": (1e4 / sx, 1e4 / sy), "resolutionunit": "CENTIMETER"}
            kwargs = dict(shape=(h, w), dtype=dtype, tile=(tile, tile), compression=compression,
                          photometric="minisblack", **res)
            data = _tiles(src, h, w, height, width, tile, transform, dtype)
            if not ome:
                tw.write(data, description=description if level == 0 else None, metadata=None,
                         subfiletype=0 if level == 0 else 1, **kwargs)
            elif level == 0:
                tw.write(data, subifds=len(shapes) - 1, metadata=meta, **kwargs)
            else:
                tw.write(data, subfiletype=1, metadata=None, **kwargs)
