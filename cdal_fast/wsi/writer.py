"""Streaming writers: pyramidal, tiled, compressed OME-TIFF (BigTIFF) from a disk-backed map.

The map produced by stitching lives on disk at working resolution (``mapfile.MapFile``, read by
row bands). Each pyramid level of the output is generated tile by tile by nearest-neighbour index
mapping from that map, so writing needs memory for one tile row at a time whatever the slide size,
and level 0 of the output has exactly the slide's level-0 pixel geometry (so it overlays the slide
pixel for pixel).

Most of a slide is background. With a :class:`~cdal_fast.wsi.tiling.Coverage` (where the sampled
tiles reach), a tile whose source region is uncovered is not read or transformed: it is the
background tile, compressed once per level and shape and written as the same bytes every time, and a
tile row with no covered cell is not even read from the map. Tiles are compressed here, by the codec
tifffile itself uses for ``compression`` (the files are byte-identical to tifffile compressing the
arrays), on a small thread pool, and handed to tifffile as encoded bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .tiling import Coverage

__all__ = ["PYRAMID_LAYOUTS", "write_pyramid", "ENCODE_THREADS", "ENCODE_BATCH"]

PYRAMID_LAYOUTS = ("ome", "openslide")  # see write_pyramid for which viewer reads which
ENCODE_THREADS = 4  # compression threads (zlib releases the GIL); at most the CPU count
ENCODE_BATCH = 32  # tiles handed to the pool at once: bounds the blocks held (32 x 512^2 x 4 bytes at most)

Encoder = Callable[[np.ndarray], bytes]


def _level_shapes(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    shapes = [(height, width)]
    while max(shapes[-1]) > tile:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _source_index(start: int, stop: int, out_len: int, full_len: int, src_len: int) -> np.ndarray:
    """Source rows (or columns) sampled by output pixels [start, stop) of a level ``out_len`` long."""
    out = np.arange(start, stop)
    return np.minimum(((out + 0.5) * (full_len / out_len) * (src_len / full_len)).astype(np.int64), src_len - 1)


def _read_rows(src: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct source rows ``rows`` needs (a contiguous slice when they are), and each row's index
    in them. Coarse levels need every 2nd, 4th ... row: only those are read."""
    unique = np.unique(rows)
    if unique[-1] - unique[0] + 1 == unique.size:
        band = np.asarray(src[int(unique[0]):int(unique[-1]) + 1])
    else:
        band = np.asarray(src[unique])
    return band, np.searchsorted(unique, rows)


class _TileEncoder:
    """Encodes tiles with tifffile's codec; background tiles come from a per-shape cache."""

    def __init__(self, encode: Encoder, tile: int, dtype: np.dtype, fill: np.ndarray, pool: ThreadPoolExecutor):
        self.encode, self.tile, self.dtype, self.fill, self.pool = encode, tile, np.dtype(dtype), fill, pool
        self._background: dict[tuple[int, int], bytes] = {}

    def block(self, content: np.ndarray) -> np.ndarray:
        """A full tile holding ``content`` top-left, zero-padded like tifffile pads edge tiles."""
        out = np.zeros((self.tile, self.tile) + content.shape[2:], dtype=self.dtype)
        out[:content.shape[0], :content.shape[1]] = content
        return out

    def background(self, rows: int, cols: int) -> bytes:
        key = (rows, cols)
        if key not in self._background:
            content = np.broadcast_to(self.fill, (rows, cols) + self.fill.shape[2:])
            self._background[key] = self.encode(self.block(content))
        return self._background[key]

    def many(self, blocks: list[np.ndarray]) -> list[bytes]:
        return list(self.pool.map(self.encode, blocks)) if len(blocks) > 1 else [self.encode(b) for b in blocks]


def _encoded_tiles(src: np.ndarray, out_h: int, out_w: int, full_h: int, full_w: int, tile: int,
                   transform: Callable[[np.ndarray], np.ndarray], enc: _TileEncoder,
                   coverage: Coverage | None) -> Iterator[bytes]:
    """Encoded tiles (row-major) of an (out_h, out_w) level sampled from ``src`` covering a (full_h, full_w)
    level 0; uncovered source regions give the background tile without being read."""
    sh, sw = src.shape[:2]
    col_index = [_source_index(tx, min(tx + tile, out_w), out_w, full_w, sw) for tx in range(0, out_w, tile)]
    for ty in range(0, out_h, tile):
        rows = _source_index(ty, min(ty + tile, out_h), out_h, full_h, sh)
        covered = coverage.columns(int(rows[0]), int(rows[-1]) + 1) if coverage is not None else None
        if covered is not None and not covered.any():
            for cols in col_index:
                yield enc.background(len(rows), len(cols))
            continue
        band, row_pos = _read_rows(src, rows)
        pending: list[tuple[int, np.ndarray]] = []  # (position in this row, block to encode)
        row_out: list[bytes | None] = []
        for cols in col_index:
            b = coverage.block if coverage is not None else 1
            if covered is not None and not covered[int(cols[0]) // b:int(cols[-1]) // b + 1].any():
                row_out.append(enc.background(len(rows), len(cols)))
                continue
            pending.append((len(row_out), enc.block(transform(band[np.ix_(row_pos, cols)]))))
            row_out.append(None)
            if len(pending) == ENCODE_BATCH:
                for (i, _), data in zip(pending, enc.many([p[1] for p in pending])):
                    row_out[i] = data
                pending = []
        for (i, _), data in zip(pending, enc.many([p[1] for p in pending])):
            row_out[i] = data
        del band
        yield from row_out  # type: ignore[misc]


def write_pyramid(path: Path, src: np.ndarray, height: int, width: int, mpp: float | None,
                  transform: Callable[[np.ndarray], np.ndarray] = lambda a: a, tile: int = 512,
                  compression: str = "zlib", description: str = "", layout: str = "ome",
                  dtype: np.dtype = np.uint8, uuid: str | None = None, coverage: Coverage | None = None) -> None:
    """Write ``transform(src)`` resampled to (height, width) as a pyramidal TIFF at ``path``.

    ``mpp`` is the resolution of level 0 (um/px); each level halves the previous one. ``layout``:
    "ome" (OME-TIFF, reduced levels as SubIFDs: QuPath/Bio-Formats, tifffile, napari) or "openslide"
    (plain BigTIFF, every level a top-level tiled IFD: OpenSlide's generic-tiff reader and the viewers
    built on it see all levels; OpenSlide treats SubIFDs as absent and would see one level).
    ``dtype`` is the stored sample type (uint8 maps; uint32 for nucleus instance labels, whose
    nearest-neighbour levels keep every label an existing id).
    ``uuid``: the OME file UUID; pass one derived from the job so that reruns and distributed runs
    write byte-identical files (tifffile otherwise draws a time-based one per file).
    ``coverage``: where ``src`` may differ from 0 (``src`` is 0 elsewhere, e.g. the stitched maps
    outside the sampled tiles); None reads everything. The file is the same either way.
    """
    import tifffile

    if layout not in PYRAMID_LAYOUTS:
        raise ValueError(f"pyramid layout must be one of {', '.join(PYRAMID_LAYOUTS)}, got {layout!r}")
    if coverage is not None and (coverage.height, coverage.width) != tuple(src.shape[:2]):
        raise ValueError(f"coverage is {coverage.height} x {coverage.width} px but the map is "
                         f"{src.shape[0]} x {src.shape[1]}")
    shapes = _level_shapes(height, width, tile)
    ome = layout == "ome"
    meta: dict = {"axes": "YX", "Description": description}
    if uuid:
        meta["UUID"] = f"urn:uuid:{uuid}"
    if mpp and ome:
        meta.update({"PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp,
                     "PhysicalSizeYUnit": "µm"})
    tag = 8 if compression.lower() == "zlib" else tifffile.COMPRESSION[compression.upper()].value
    codec = tifffile.TIFF.COMPRESSORS[tag]
    fill = np.asarray(transform(np.zeros((1, 1) + src.shape[2:], dtype=src.dtype)), dtype=dtype)
    with ThreadPoolExecutor(max(1, min(ENCODE_THREADS, os.cpu_count() or 1))) as pool, \
            tifffile.TiffWriter(path, bigtiff=True, ome=ome) as tw:
        enc = _TileEncoder(codec, tile, dtype, fill, pool)
        for level, (h, w) in enumerate(shapes):
            res: dict = {}
            if mpp:
                # level pixel size = level-0 size x the level's actual downsample (odd sizes round up)
                sx, sy = mpp * width / w, mpp * height / h
                res = {"resolution": (1e4 / sx, 1e4 / sy), "resolutionunit": "CENTIMETER"}
            kwargs = dict(shape=(h, w), dtype=dtype, tile=(tile, tile), compression=tag,
                          photometric="minisblack", **res)
            data = _encoded_tiles(src, h, w, height, width, tile, transform, enc, coverage)
            if not ome:
                tw.write(data, description=description if level == 0 else None, metadata=None,
                         subfiletype=0 if level == 0 else 1, **kwargs)
            elif level == 0:
                tw.write(data, subifds=len(shapes) - 1, metadata=meta, **kwargs)
            else:
                tw.write(data, subfiletype=1, metadata=None, **kwargs)
