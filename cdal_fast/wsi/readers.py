"""Slide readers with lazy region access and resolution metadata.

* :class:`TiffSlide`: flat or pyramidal TIFF, BigTIFF, OME-TIFF, SVS-style TIFF through tifffile.
  Only the tiles/strips a region touches are read and decoded.
* :class:`OpenSlideSlide`: vendor formats (SVS, NDPI, MRXS, ...) through OpenSlide, if installed.
* :class:`SmallImage`: PNG / JPEG, read whole (they are small by nature).

All return RGB uint8 arrays (H, W, 3); greyscale is expanded, alpha dropped.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SlideError", "SlideReader", "TiffSlide", "OpenSlideSlide", "SmallImage", "open_slide",
           "SLIDE_SUFFIXES", "OPENSLIDE_SUFFIXES"]

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".ome.tif", ".ome.tiff")
SMALL_SUFFIXES = (".png", ".jpg", ".jpeg")
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
SLIDE_SUFFIXES = TIFF_SUFFIXES + SMALL_SUFFIXES + OPENSLIDE_SUFFIXES
_UNIT_TO_UM = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "nm": 1e-3, "Å": 1e-4}


class SlideError(RuntimeError):
    """A slide cannot be opened or read; the message says why and what to do."""


@dataclass
class Level:
    width: int
    height: int
    downsample: float


class SlideReader:
    """Interface: ``levels``, ``mpp`` (um/px at level 0 or None), ``read_region``."""

    path: Path
    levels: list[Level]
    mpp: float | None
    mpp_source: str

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) at ``level``; (x, y) in that level's pixels. Outside is white."""
        raise NotImplementedError

    def thumbnail(self, max_side: int = 2048, max_downsample: float | None = None) -> tuple[np.ndarray, float]:
        """Smallest level whose longer side is >= ``max_side`` (or the smallest), and its downsample.

        ``max_downsample`` caps the level's downsample (finer levels win), so that objects of a given
        physical size stay visible however large the slide is (see ``tissue.max_detection_mpp``).
        """
        best = len(self.levels) - 1
        for i, lv in enumerate(self.levels):
            if max(lv.width, lv.height) >= max_side:
                best = i
        if max_downsample is not None:
            while best > 0 and self.levels[best].downsample > max_downsample:
                best -= 1
        lv = self.levels[best]
        if lv.width * lv.height > 64e6:
            raise SlideError(f"{self.path}: no pyramid level small enough for a thumbnail "
                             f"(smallest is {lv.width}x{lv.height}); convert the slide to a pyramidal TIFF")
        return self.read_region(best, 0, 0, lv.width, lv.height), lv.downsample

    def close(self) -> None:
        pass

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.dtype != np.uint8:
        if arr.dtype == np.uint16:
            arr = (arr >> 8).astype(np.uint8)
        else:
            raise SlideError(f"unsupported pixel type {arr.dtype} (8- or 16-bit RGB/grey expected)")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def _blank_and_box(lv: Level, x: int, y: int, w: int, h: int) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """A white (h, w, 3) canvas and the part of the region inside the level (None if nothing is)."""
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lv.width), min(y + h, lv.height)
    return out, ((x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None)


def _plausible(mpp: float | None) -> float | None:
    # Screen defaults (72/96 dpi) and bogus tags give absurd values; microscopy is 0.05-20 um/px.
    return mpp if mpp is not None and 0.05 <= mpp <= 20 else None


class TiffSlide(SlideReader):
    def __init__(self, path: str | Path) -> None:
        import tifffile

        self.path = Path(path)
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
            self._pages = [lv.keyframe for lv in series.levels]
        except Exception as exc:
            raise SlideError(f"{self.path}: not a readable TIFF ({exc})") from exc
        base = self._pages[0]
        if base.ndim not in (2, 3) or (base.ndim == 3 and base.shape[2] not in (1, 3, 4)):
            raise SlideError(f"{self.path}: unsupported TIFF layout {base.shape} (RGB or grey expected)")
        if base.planarconfig == 2 and base.samplesperpixel > 1:
            raise SlideError(f"{self.path}: planar (separate) RGB TIFFs are not supported; use contiguous RGB")
        w0 = base.imagewidth
        self.levels = [Level(p.imagewidth, p.imagelength, w0 / p.imagewidth) for p in self._pages]
        self.mpp, self.mpp_source = self._read_mpp()

    def _read_mpp(self) -> tuple[float | None, str]:
        tif, page = self._tif, self._pages[0]
        if tif.ome_metadata:
            try:
                root = ET.fromstring(tif.ome_metadata)
                for el in root.iter():
                    if el.tag.endswith("Pixels") and el.get("PhysicalSizeX"):
                        unit = el.get("PhysicalSizeXUnit", "µm")
                        mpp = _plausible(float(el.get("PhysicalSizeX")) * _UNIT_TO_UM.get(unit, 1.0))
                        if mpp:
                            return mpp, "OME PhysicalSizeX"
            except ET.ParseError:
                pass
        desc = page.description or ""
        m = re.search(r"MPP\s*=\s*([0-9.]+)", desc)
        if m and _plausible(float(m.group(1))):
            return float(m.group(1)), "ImageDescription MPP"
        xres = page.tags.get("XResolution")
        unit = page.tags.get("ResolutionUnit")
        if xres is not None and unit is not None:
            num, den = xres.value
            per_unit = num / den if den else 0.0
            scale = {2: 25400.0, 3: 10000.0}.get(int(unit.value), 0.0)
            if per_unit > 0 and scale:
                mpp = _plausible(scale / per_unit)
                if mpp:
                    return mpp, "TIFF XResolution"
        return None, "none"

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        page = self._pages[level]
        lv = self.levels[level]
        out, box = _blank_and_box(lv, x, y, w, h)
        if box is None:
            return out
        x0, y0, x1, y1 = box
        fh = self._tif.filehandle
        if page.is_tiled:
            tw, th = page.tilewidth, page.tilelength
            ntx = math.ceil(lv.width / tw)
            cells = [(ty * ntx + tx, tx * tw, ty * th) for ty in range(y0 // th, (y1 - 1) // th + 1)
                     for tx in range(x0 // tw, (x1 - 1) // tw + 1)]
        else:
            rps = min(page.rowsperstrip or lv.height, lv.height)
            cells = [(i, 0, i * rps) for i in range(y0 // rps, (y1 - 1) // rps + 1)]
        for index, cx, cy in cells:
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            if count == 0:
                continue
            fh.seek(offset)
            data = fh.read(count)
            try:
                seg, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
            except Exception as exc:
                raise SlideError(f"{self.path}: cannot decode tile/strip {index} ({exc})") from exc
            if seg is None:
                continue
            seg = _to_rgb(np.asarray(seg).reshape(shape[1], shape[2], shape[3]))
            sh, sw = seg.shape[:2]
            ix0, iy0 = max(x0, cx), max(y0, cy)
            ix1, iy1 = min(x1, cx + sw), min(y1, cy + sh)
            if ix1 > ix0 and iy1 > iy0:
                out[iy0 - y:iy1 - y, ix0 - x:ix1 - x] = seg[iy0 - cy:iy1 - cy, ix0 - cx:ix1 - cx]
        return out

    def close(self) -> None:
        self._tif.close()


class OpenSlideSlide(SlideReader):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            import openslide
        except ImportError:
            raise SlideError(
                f"{self.path}: {self.path.suffix} slides need OpenSlide; install it with "
                "`pip install openslide-python openslide-bin` (or convert the slide to OME-TIFF)"
            ) from None
        try:
            self._s = openslide.OpenSlide(str(self.path))
        except Exception as exc:
            raise SlideError(f"{self.path}: OpenSlide cannot open it ({exc})") from exc
        self.levels = [Level(w, h, d) for (w, h), d in zip(self._s.level_dimensions, self._s.level_downsamples)]
        mpp = self._s.properties.get("openslide.mpp-x")
        self.mpp = _plausible(float(mpp)) if mpp else None
        self.mpp_source = "openslide.mpp-x" if self.mpp else "none"

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        d = self.levels[level].downsample
        rgba = np.asarray(self._s.read_region((int(x * d), int(y * d)), level, (w, h)))
        rgb = rgba[:, :, :3].copy()
        rgb[rgba[:, :, 3] == 0] = 255  # transparent = outside the scanned area
        return rgb

    def close(self) -> None:
        self._s.close()


class SmallImage(SlideReader):
    def __init__(self, path: str | Path) -> None:
        from PIL import Image

        self.path = Path(path)
        try:
            with Image.open(self.path) as im:
                dpi = im.info.get("dpi")
                self._arr = _to_rgb(np.asarray(im.convert("RGB")))
        except Exception as exc:
            raise SlideError(f"{self.path}: not a readable image ({exc})") from exc
        h, w = self._arr.shape[:2]
        self.levels = [Level(w, h, 1.0)]
        self.mpp = _plausible(25400.0 / float(dpi[0])) if dpi and dpi[0] else None
        self.mpp_source = "PNG/JPEG dpi" if self.mpp else "none"

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        out, box = _blank_and_box(self.levels[0], x, y, w, h)
        if box is not None:
            x0, y0, x1, y1 = box
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._arr[y0:y1, x0:x1]
        return out


def open_slide(path: str | Path) -> SlideReader:
    """Pick the reader by file name; raise :class:`SlideError` with a clear reason on failure."""
    p = Path(path)
    name = p.name.lower()
    if not p.is_file():
        raise SlideError(f"{p}: file not found")
    if name.endswith(SMALL_SUFFIXES):
        return SmallImage(p)
    if name.endswith(TIFF_SUFFIXES):
        return TiffSlide(p)
    if name.endswith(OPENSLIDE_SUFFIXES):
        return OpenSlideSlide(p)
    raise SlideError(f"{p}: unsupported file type {p.suffix!r} (TIFF/OME-TIFF, PNG/JPEG, or OpenSlide formats)")
