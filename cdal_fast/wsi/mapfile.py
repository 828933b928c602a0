"""Disk-backed 2-D uint8 maps read and written row band by row band with plain file I/O.

The stitched maps of a slide are as large as the slide at working resolution (2.5 GB each for a
100000^2 px slide at 0.25 um/px). Through ``numpy.memmap`` every page the stitcher writes or the
writer reads stays mapped into the process and counts as its resident memory, so peak RSS grew
with the slide (3.3 GB on a 100000^2 slide that sampled no tile). :class:`MapFile` reads and
writes with ``pread``/``pwrite`` instead: the kernel's page cache still does the caching, but the
process holds only the band it asked for. The file is a valid ``.npy`` (``np.load`` reads it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["MapFile", "MAX_IO_BYTES"]

# Linux moves at most 0x7ffff000 bytes per read/write call (short reads/writes beyond); larger bands
# (a coarse pyramid level's rows of a 100000^2 map) are moved in pieces of at most this size.
MAX_IO_BYTES = 1 << 30


def _pread_exact(fd: int, size: int, offset: int) -> bytearray:
    """``size`` bytes at ``offset``, however many calls it takes (a hole reads as zeros)."""
    out = bytearray(size)
    view = memoryview(out)
    done = 0
    while done < size:
        n = os.preadv(fd, [view[done:done + min(MAX_IO_BYTES, size - done)]], offset + done)
        if n <= 0:
            raise OSError(f"read past the end of the map: {done} of {size} bytes at offset {offset}")
        done += n
    return out


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:done + MAX_IO_BYTES], offset + done)


class MapFile:
    """A (height, width) uint8 ``.npy`` file with row-band access: ``m[a:b]``, ``m[a:b] = rows``,
    ``m[int_array]`` (selected rows), ``np.asarray(m)`` (all of it: small images only)."""

    dtype = np.dtype(np.uint8)

    def __init__(self, path: Path, shape: tuple[int, int], offset: int) -> None:
        self.path, self.shape, self._offset = Path(path), (int(shape[0]), int(shape[1])), offset
        self._fd = os.open(self.path, os.O_RDWR)

    @classmethod
    def create(cls, path: Path, shape: tuple[int, int]) -> MapFile:
        """A zero-filled map (a sparse file: nothing is written for rows never set)."""
        with open(path, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False,
                                                      "shape": (int(shape[0]), int(shape[1]))})
            offset = fh.tell()
            fh.truncate(offset + int(shape[0]) * int(shape[1]))
        return cls(path, shape, offset)

    @classmethod
    def open(cls, path: Path) -> MapFile:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(fh)
            if dtype != cls.dtype or len(shape) != 2:
                raise ValueError(f"{path}: expected a 2-D uint8 map, found {dtype} {shape}")
            return cls(path, shape, fh.tell())

    def _rows(self, key: slice) -> tuple[int, int]:
        start, stop, step = key.indices(self.shape[0])
        if step != 1:
            raise IndexError("MapFile supports contiguous row slices only")
        return start, max(start, stop)

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        w = self.shape[1]
        if isinstance(key, slice):
            a, b = self._rows(key)
            data = _pread_exact(self._fd, (b - a) * w, self._offset + a * w)
            return np.frombuffer(data, np.uint8).reshape(b - a, w)
        rows = np.asarray(key, dtype=np.int64)
        out = np.empty((len(rows), w), np.uint8)
        for i, r in enumerate(rows):
            out[i] = np.frombuffer(_pread_exact(self._fd, w, self._offset + int(r) * w), np.uint8)
        return out

    def __setitem__(self, key: slice, rows: np.ndarray) -> None:
        a, b = self._rows(key)
        rows = np.ascontiguousarray(rows, dtype=np.uint8)
        if rows.shape != (b - a, self.shape[1]):
            raise ValueError(f"{self.path}: rows {a}:{b} need shape {(b - a, self.shape[1])}, got {rows.shape}")
        _pwrite_all(self._fd, memoryview(rows).cast("B"), self._offset + a * self.shape[1])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        arr = self[0:self.shape[0]]
        return arr if dtype is None else arr.astype(dtype)

    def flush(self) -> None:
        """Nothing to do: every write went to the file (the page cache) when it was made."""

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()
