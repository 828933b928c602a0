"""Slide readers with lazy region access and resolution metadata.

* :class:`TiffSlide`: flat or pyramidal TIFF, BigTIFF, OME-TIFF, SVS-style TIFF through tifffile.
  Only the tiles/strips a region touches are read and decoded.
* :class:`OpenSlideSlide`: vendor formats (SVS, NDPI, MRXS, ...) through OpenSlide, if installed.
* :class:`DicomSlide`: DICOM WSI (a folder of instances, or a ``.dcm`` file) through OpenSlide 4, after
  :mod:`.dicom` has checked the series.
* :class:`SmallImage`: PNG / JPEG, read whole (they are small by nature).

All return RGB uint8 arrays (H, W, 3); greyscale is expanded, alpha dropped. The level-0 resolution
and its fallbacks (objective power, anisotropy) are settled by ``mpp.settle_mpp``.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..extras import import_extra
from ..sampling.imageio import undecodable_tiff
from .dicom import is_dicom_folder, level0_instance
from .errors import SlideError
from .mpp import MppInfo, plausible_mpp, settle_mpp

__all__ = ["SlideError", "SlideReader", "TiffSlide", "OpenSlideSlide", "DicomSlide", "SmallImage", "open_slide",
           "SLIDE_SUFFIXES", "OPENSLIDE_SUFFIXES", "DICOM_SUFFIXES", "MAX_SEGMENT_BYTES"]

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".ome.tif", ".ome.tiff")
SMALL_SUFFIXES = (".png", ".jpg", ".jpeg")
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
DICOM_SUFFIXES = (".dcm",)  # a DICOM WSI is read from its folder; see dicom.py
SLIDE_SUFFIXES = TIFF_SUFFIXES + SMALL_SUFFIXES + OPENSLIDE_SUFFIXES + DICOM_SUFFIXES
MAX_SEGMENT_BYTES = 256 * 2**20  # one decoded tile/strip; a flat TIFF stored as one huge strip is refused
SEGMENT_CACHE_BYTES = 32 * 2**20  # decoded tiles/strips kept per reader (always at least the last one)
LEVEL_ASPECT_TOLERANCE = 0.02  # a level's height may differ this much (or 2 px) from level 0's aspect
_UNIT_TO_UM = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "nm": 1e-3, "Å": 1e-4}


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
    mpp_warning: str | None = None  # set when the resolution is a convention (objective power), not measured
    mpp_anisotropic: tuple[float, float] | None = None  # (x, y) um/px when the pixels are not square

    def _set_mpp(self, info: MppInfo) -> None:
        self.mpp, self.mpp_source = info.mpp, info.source
        self.mpp_warning, self.mpp_anisotropic = info.warning, info.anisotropic

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


class TiffSlide(SlideReader):
    decoded: int = 0  # tiles/strips decoded so far (the cache's misses)

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
        self._file_size = self.path.stat().st_size
        for i, page in enumerate(self._pages):
            self._check_page(i, page)
        w0, h0 = base.imagewidth, base.imagelength
        self.levels = [Level(p.imagewidth, p.imagelength, w0 / p.imagewidth) for p in self._pages]
        for i, lv in enumerate(self.levels[1:], start=1):
            expected_h = h0 / lv.downsample
            if lv.width > w0 or lv.height > h0 or abs(lv.height - expected_h) > max(2.0, LEVEL_ASPECT_TOLERANCE
                                                                                      * expected_h):
                raise SlideError(f"{self.path}: pyramid level {i} ({lv.width}x{lv.height}) does not match level 0 "
                                 f"({w0}x{h0}): levels must shrink both sides by the same factor")
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()  # (level, index) -> decoded RGB
        self._set_mpp(self._read_mpp())

    def _check_page(self, level: int, page) -> None:
        """Sizes, tile table and byte ranges of one level, before anything is allocated from them."""
        where = f"{self.path}: level {level}"
        if (why := undecodable_tiff(page.compression)) is not None:
            raise SlideError(f"{where}: {why}")
        w, h = int(page.imagewidth), int(page.imagelength)
        if w <= 0 or h <= 0:
            raise SlideError(f"{where} is {w}x{h} px: an image needs at least one pixel in each direction")
        planes = page.samplesperpixel if page.planarconfig == 2 else 1
        item = page.samplesperpixel * max(1, page.bitspersample // 8)
        if page.is_tiled:
            tw, th = int(page.tilewidth), int(page.tilelength)
            if tw <= 0 or th <= 0:
                raise SlideError(f"{where}: tile size {tw}x{th} is invalid")
            needed = math.ceil(w / tw) * math.ceil(h / th) * planes
            segment_bytes = tw * th * item
            kind = f"{tw}x{th} tiles"
        else:
            rps = min(int(page.rowsperstrip or h), h)
            if rps <= 0:
                raise SlideError(f"{where}: RowsPerStrip {rps} is invalid")
            needed = math.ceil(h / rps) * planes
            segment_bytes = rps * w * item
            kind = f"strips of {rps} rows"
        offsets, counts = page.dataoffsets, page.databytecounts
        if len(offsets) < needed or len(counts) != len(offsets):
            raise SlideError(f"{where}: the header says {w}x{h} px in {kind}, which needs {needed} entries, but "
                             f"the file lists {len(offsets)} offsets and {len(counts)} byte counts")
        if segment_bytes > MAX_SEGMENT_BYTES:
            raise SlideError(f"{where}: {kind} of {w} px decode to {segment_bytes / 2**20:.0f} MiB each (limit "
                             f"{MAX_SEGMENT_BYTES / 2**20:.0f} MiB); every tile read would decode that much: convert "
                             "the image to a tiled (pyramidal) TIFF, e.g. with `vips tiffsave --tile --pyramid`")
        if len(offsets):
            ends = np.asarray(offsets[:needed], dtype=np.int64) + np.asarray(counts[:needed], dtype=np.int64)
            if int(ends.max()) > self._file_size:
                raise SlideError(f"{where}: a tile/strip ends at byte {int(ends.max())}, beyond the end of the "
                                 f"file ({self._file_size} bytes): the file is truncated or its tile table is wrong")

    def _read_mpp(self) -> MppInfo:
        tif, page = self._tif, self._pages[0]
        objective: tuple[float, str] | None = None
        if tif.ome_metadata:
            try:
                root = ET.fromstring(tif.ome_metadata)
                for el in root.iter():
                    if el.tag.endswith("}Objective") and el.get("NominalMagnification"):
                        objective = (float(el.get("NominalMagnification")), "OME NominalMagnification")
                for el in root.iter():
                    if el.tag.endswith("Pixels") and el.get("PhysicalSizeX"):
                        ux = _UNIT_TO_UM.get(el.get("PhysicalSizeXUnit", "µm"), 1.0)
                        uy = _UNIT_TO_UM.get(el.get("PhysicalSizeYUnit", "µm"), 1.0)
                        y = el.get("PhysicalSizeY")
                        info = settle_mpp(float(el.get("PhysicalSizeX")) * ux, float(y) * uy if y else None,
                                          "OME PhysicalSizeX")
                        if info.mpp:
                            return info
            except (ET.ParseError, ValueError):
                pass
        desc = page.description or ""
        m = re.search(r"MPP\s*=\s*([0-9.]+)", desc)
        if m and plausible_mpp(float(m.group(1))):
            return MppInfo(float(m.group(1)), "ImageDescription MPP")
        xres, yres = page.tags.get("XResolution"), page.tags.get("YResolution")
        unit = page.tags.get("ResolutionUnit")
        if xres is not None and unit is not None:
            scale = {2: 25400.0, 3: 10000.0}.get(int(unit.value), 0.0)

            def size(tag: object) -> float | None:
                num, den = tag.value
                per_unit = num / den if den else 0.0
                return scale / per_unit if per_unit > 0 and scale else None

            info = settle_mpp(size(xres), size(yres) if yres is not None else None, "TIFF XResolution")
            if info.mpp:
                return info
        m = re.search(r"AppMag\s*=\s*([0-9.]+)", desc)
        if m and objective is None:
            objective = (float(m.group(1)), "ImageDescription AppMag")
        if objective:
            return settle_mpp(None, None, "none", objective[0], objective[1])
        return MppInfo(None, "none")

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
            seg = self._segment(level, index, page, fh)
            if seg is None:
                continue
            sh, sw = seg.shape[:2]
            ix0, iy0 = max(x0, cx), max(y0, cy)
            ix1, iy1 = min(x1, cx + sw), min(y1, cy + sh)
            if ix1 > ix0 and iy1 > iy0:
                out[iy0 - y:iy1 - y, ix0 - x:ix1 - x] = seg[iy0 - cy:iy1 - cy, ix0 - cx:ix1 - cx]
        return out

    def _segment(self, level: int, index: int, page, fh) -> np.ndarray | None:
        """Decoded RGB tile/strip ``index``. Recently decoded ones are kept (LRU, ``SEGMENT_CACHE_BYTES``),
        so the tiles that share a strip (flat striped TIFFs) decode it once, not once per tile."""
        key = (level, index)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if count == 0:
            return None
        fh.seek(offset)
        data = fh.read(count)
        try:
            seg, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
            if seg is None:
                return None
            rgb = _to_rgb(np.asarray(seg).reshape(shape[1], shape[2], shape[3]))
        except Exception as exc:
            raise SlideError(f"{self.path}: cannot decode level {level} tile/strip {index} "
                             f"({type(exc).__name__}: {exc})") from exc
        self._cache[key] = rgb
        self.decoded += 1
        held = sum(a.nbytes for a in self._cache.values())
        while len(self._cache) > 1 and held > SEGMENT_CACHE_BYTES:
            held -= self._cache.popitem(last=False)[1].nbytes
        return rgb

    def close(self) -> None:
        self._tif.close()


class OpenSlideSlide(SlideReader):
    mpp_label = "openslide.mpp-x"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        openslide = import_extra("openslide", f"{self.path}: reading {self.path.suffix} slides", SlideError)
        try:
            self._s = openslide.OpenSlide(str(self.path))
        except Exception as exc:
            raise SlideError(f"{self.path}: OpenSlide cannot open it ({exc})") from exc
        self.levels = [Level(w, h, d) for (w, h), d in zip(self._s.level_dimensions, self._s.level_downsamples)]
        self._set_mpp(self._read_mpp())

    def _read_mpp(self) -> MppInfo:
        props = self._s.properties

        def number(key: str) -> float | None:
            try:
                return float(props[key]) if props.get(key) else None
            except ValueError:
                return None

        return settle_mpp(number("openslide.mpp-x"), number("openslide.mpp-y"), self.mpp_label,
                          number("openslide.objective-power"), "openslide.objective-power")

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
        self._set_mpp(settle_mpp(25400.0 / float(dpi[0]) if dpi and dpi[0] else None,
                                 25400.0 / float(dpi[1]) if dpi and len(dpi) > 1 and dpi[1] else None,
                                 "PNG/JPEG dpi"))

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        out, box = _blank_and_box(self.levels[0], x, y, w, h)
        if box is not None:
            x0, y0, x1, y1 = box
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._arr[y0:y1, x0:x1]
        return out


class DicomSlide(OpenSlideSlide):
    """A DICOM WSI folder or instance; levels, pixels and mpp through OpenSlide's DICOM reader."""

    mpp_label = "DICOM PixelSpacing"

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        level0 = level0_instance(path)
        super().__init__(level0)
        self.path = path
        if self._s.properties.get("openslide.vendor") != "dicom":
            raise SlideError(f"{path}: OpenSlide did not read it as DICOM "
                             f"(vendor {self._s.properties.get('openslide.vendor')!r})")


def open_slide(path: str | Path) -> SlideReader:
    """Pick the reader by file name; raise :class:`SlideError` with a clear reason on failure."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir() or name.endswith(DICOM_SUFFIXES):
        if p.is_dir() and not is_dicom_folder(p):
            raise SlideError(f"{p}: a folder is read as a slide only when it holds DICOM instances; it holds none")
        if not p.exists():
            raise SlideError(f"{p}: file not found")
        return DicomSlide(p)
    if not p.is_file():
        if p.is_symlink():
            raise SlideError(f"{p}: a broken or looping symbolic link")
        raise SlideError(f"{p}: file not found")
    if name.endswith(SMALL_SUFFIXES):
        return SmallImage(p)
    if name.endswith(TIFF_SUFFIXES):
        return TiffSlide(p)
    if name.endswith(OPENSLIDE_SUFFIXES):
        return OpenSlideSlide(p)
    raise SlideError(f"{p}: unsupported file type {p.suffix!r} (TIFF/OME-TIFF, PNG/JPEG, DICOM, or OpenSlide "
                     "formats)")
