"""Regions of interest: where on a slide the user wants results.

Two sources, both in the slide's level-0 pixel frame:

* GeoJSON polygons (a FeatureCollection, a Feature, a bare geometry, or a list of features, as
  QuPath exports annotations). Polygons with holes and MultiPolygons are supported; each
  feature is validated with shapely and an invalid one is an error naming the file, the feature's
  index and its name. The ROI is the union of all features.
* A binary mask image (PNG/TIFF/JPEG; non-zero = inside) at any pyramid scale: its scale is the
  slide size divided by the mask size, which must be the same in x and y (up to rounding).

A folder given as the ROI holds one ``NAME.geojson`` (or mask ``NAME.png``/``NAME.tif``) per slide,
matched by the slide's name, for batches.

The ROI is rasterised at whatever scale the caller needs: at the tissue thumbnail scale with
``all_touched`` (every pixel the outline touches counts, so planning never drops a tile the ROI
touches) and at the working scale by pixel centres (outputs outside the ROI are background).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..hashing import file_sha256
from .readers import SlideError

__all__ = ["Roi", "load_roi", "roi_file", "roi_for_slide", "ROI_GEOJSON_SUFFIXES", "ROI_MASK_SUFFIXES"]

ROI_GEOJSON_SUFFIXES = (".geojson", ".json")
ROI_MASK_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
_POLYGON_TYPES = ("Polygon", "MultiPolygon")
MASK_SCALE_TOLERANCE = 0.02  # x and y scales of a mask ROI may differ by 2 % (pyramid rounding)


@dataclass
class Roi:
    source: Path
    kind: str  # "geojson" or "mask"
    features: int
    geometry: Any = None  # shapely (Multi)Polygon in level-0 pixels (geojson)
    mask: np.ndarray | None = None  # bool (mask)
    mask_scale: tuple[float, float] = (1.0, 1.0)  # level-0 px per mask px in (x, y) (mask)
    sha256: str = ""  # of the file: a rerun resumes only outputs made with the same ROI (resume.py)

    def area_px(self) -> float:
        """Area in level-0 pixels."""
        if self.geometry is not None:
            return float(self.geometry.area)
        return float(self.mask.sum()) * self.mask_scale[0] * self.mask_scale[1]

    def rasterise(self, height: int, width: int, downsample: float, row0: int = 0,
                  all_touched: bool = False) -> np.ndarray:
        """Bool (height, width) raster of rows [row0, row0 + height) of a grid with ``downsample``
        level-0 px per pixel. ``all_touched``: pixels the outline touches count as inside."""
        if self.geometry is not None:
            return _rasterise_polygons(self.geometry, height, width, downsample, row0, all_touched)
        return _resample_mask(self.mask, self.mask_scale, height, width, downsample, row0, all_touched)


def _rings(geometry: Any) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    polys = list(geometry.geoms) if geometry.geom_type == "MultiPolygon" else [geometry]
    return [(np.asarray(p.exterior.coords), [np.asarray(r.coords) for r in p.interiors])
            for p in polys if not p.is_empty]


def _rasterise_polygons(geometry: Any, height: int, width: int, downsample: float, row0: int,
                        all_touched: bool) -> np.ndarray:
    from skimage.draw import line, polygon

    out = np.zeros((height, width), dtype=bool)
    shape = (height, width)

    def to_px(ring: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # pixel i covers [i, i + 1) * downsample; skimage tests integer coordinates = pixel centres
        return ring[:, 1] / downsample - 0.5 - row0, ring[:, 0] / downsample - 0.5

    for exterior, holes in _rings(geometry):
        r, c = to_px(exterior)
        if r.max() < -1 or r.min() > height + 1:
            continue
        out[polygon(r, c, shape)] = True
        for hole in holes:
            hr, hc = to_px(hole)
            out[polygon(hr, hc, shape)] = False
        if all_touched:
            for ring in [exterior, *holes]:
                rr, cc = to_px(ring)
                rr, cc = np.round(rr).astype(np.int64), np.round(cc).astype(np.int64)
                for k in range(len(rr) - 1):  # the pixels containing each edge (Bresenham)
                    lr, lc = line(rr[k], cc[k], rr[k + 1], cc[k + 1])
                    ok = (lr >= 0) & (lr < height) & (lc >= 0) & (lc < width)
                    out[lr[ok], lc[ok]] = True
    return out


def _resample_mask(mask: np.ndarray, scale: tuple[float, float], height: int, width: int, downsample: float,
                   row0: int, all_touched: bool) -> np.ndarray:
    """Nearest-neighbour by pixel centres; ``all_touched``: any mask pixel under the output pixel
    (an integral image answers each pixel's box in O(1))."""
    mh, mw = mask.shape
    if all_touched:
        integral = np.zeros((mh + 1, mw + 1), dtype=np.int64)
        integral[1:, 1:] = mask.cumsum(0).cumsum(1)

        def edges(n: int, start: int, step: float, limit: int) -> tuple[np.ndarray, np.ndarray]:
            lo = np.floor(np.arange(start, start + n) * step).astype(np.int64)
            hi = np.maximum(np.ceil(np.arange(start + 1, start + n + 1) * step).astype(np.int64), lo + 1)
            return lo.clip(0, limit), hi.clip(0, limit)

        y0, y1 = edges(height, row0, downsample / scale[1], mh)
        x0, x1 = edges(width, 0, downsample / scale[0], mw)
        count = (integral[np.ix_(y1, x1)] - integral[np.ix_(y0, x1)] - integral[np.ix_(y1, x0)]
                 + integral[np.ix_(y0, x0)])
        return count > 0
    ys = ((np.arange(row0, row0 + height) + 0.5) * downsample / scale[1]).astype(np.int64)
    xs = ((np.arange(width) + 0.5) * downsample / scale[0]).astype(np.int64)
    inside_y, inside_x = ys < mh, xs < mw
    out = np.zeros((height, width), dtype=bool)
    out[np.ix_(inside_y, inside_x)] = mask[np.ix_(ys[inside_y], xs[inside_x])]
    return out


def _feature_name(feature: dict, index: int) -> str:
    props = feature.get("properties") or {}
    name = props.get("name") or (props.get("classification") or {}).get("name") or feature.get("id")
    return f"feature {index}" + (f" ({name!r})" if name else "")


def _load_geojson(path: Path) -> Roi:
    import shapely
    from shapely.geometry import shape

    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SlideError(f"{path}: not a readable GeoJSON file ({exc})") from exc
    if isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features") or []
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and data.get("type") in _POLYGON_TYPES:
        features = [{"geometry": data}]
    else:
        raise SlideError(f"{path}: expected a GeoJSON FeatureCollection, Feature or Polygon, "
                         f"got {type(data).__name__} {data.get('type') if isinstance(data, dict) else ''}".rstrip())
    geoms = []
    for i, feature in enumerate(features):
        name = _feature_name(feature, i) if isinstance(feature, dict) else f"feature {i}"
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        if not geometry:
            raise SlideError(f"{path}: {name} has no geometry")
        if geometry.get("type") not in _POLYGON_TYPES:
            raise SlideError(f"{path}: {name} is a {geometry.get('type')}; a region of interest must be a "
                             "Polygon or MultiPolygon")
        try:
            geom = shape(geometry)
        except Exception as exc:
            raise SlideError(f"{path}: {name} has malformed coordinates ({exc})") from exc
        if not geom.is_valid:
            raise SlideError(f"{path}: {name} is an invalid polygon: {shapely.is_valid_reason(geom)} "
                             "(fix it in the annotation tool, e.g. remove the self-intersection)")
        geoms.append(geom)
    if not geoms:
        raise SlideError(f"{path}: no polygons in the GeoJSON (an empty region of interest)")
    return Roi(path, "geojson", len(geoms), geometry=shapely.union_all(geoms))


def _load_mask(path: Path, slide_w: int, slide_h: int) -> Roi:
    from PIL import Image

    try:
        with Image.open(path) as im:
            mask = np.asarray(im.convert("L")) > 0
    except Exception as exc:
        raise SlideError(f"{path}: not a readable mask image ({exc})") from exc
    mh, mw = mask.shape
    sx, sy = slide_w / mw, slide_h / mh
    if abs(sx - sy) > MASK_SCALE_TOLERANCE * max(sx, sy) + 1.0 / min(mw, mh) * max(sx, sy):
        raise SlideError(f"{path}: a {mw} x {mh} mask is not a scaled copy of the {slide_w} x {slide_h} slide "
                         f"(scales {sx:.4g} in x, {sy:.4g} in y); export it at one pyramid scale")
    return Roi(path, "mask", 1, mask=mask, mask_scale=(sx, sy))


def load_roi(path: Path, slide_w: int, slide_h: int) -> Roi:
    """Read the ROI file ``path`` (GeoJSON or mask image) for a ``slide_w`` x ``slide_h`` slide."""
    name = path.name.lower()
    if name.endswith(ROI_GEOJSON_SUFFIXES):
        roi = _load_geojson(path)
    elif name.endswith(ROI_MASK_SUFFIXES):
        roi = _load_mask(path, slide_w, slide_h)
    else:
        raise SlideError(f"{path}: unsupported ROI file (GeoJSON {', '.join(ROI_GEOJSON_SUFFIXES)} or a mask image "
                         f"{', '.join(ROI_MASK_SUFFIXES)})")
    roi.sha256 = file_sha256(path)
    return roi


def roi_file(roi: Path, stem: str) -> Path:
    """The ROI file for slide ``stem``: ``roi`` itself, or ``roi/stem.<suffix>`` when ``roi`` is a folder."""
    if not roi.is_dir():
        return roi
    for suffix in ROI_GEOJSON_SUFFIXES + ROI_MASK_SUFFIXES:
        candidate = roi / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise SlideError(f"{roi}: no region of interest for slide {stem!r} (expected {stem}.geojson or a mask "
                     f"{stem}.png / {stem}.tif in the folder)")


def roi_for_slide(roi: Path, stem: str, slide_w: int, slide_h: int) -> Roi:
    """The ROI for slide ``stem`` (:func:`roi_file`), read for a ``slide_w`` x ``slide_h`` slide."""
    return load_roi(roi_file(roi, stem), slide_w, slide_h)
