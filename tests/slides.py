"""Build real test slides (pyramidal OME-TIFF, flat TIFF) from image arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile


def write_ome_pyramid(path: Path, rgb: np.ndarray, mpp: float | None, levels: int = 3, tile: int = 256) -> Path:
    """A tiled, deflate-compressed pyramidal OME-TIFF (SubIFDs), like a scanner export."""
    meta = {"axes": "YXS"}
    if mpp:
        meta.update({"PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"})
    pyramid = [rgb]
    for _ in range(levels - 1):
        a = pyramid[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        pyramid.append(a[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8))
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        for i, a in enumerate(pyramid):
            kw = dict(tile=(tile, tile), compression="zlib", photometric="rgb")
            if i == 0:
                tw.write(a, subifds=levels - 1, metadata=meta, **kw)
            else:
                tw.write(a, subfiletype=1, **kw)
    return path
