"""MoNuSeg ground-truth instances from the Aperio ImageScope XML polygons.

Only 13 of the 30 shared training tiles have their XML (``train/annotations/NAME.xml.gz``); the
semantic masks of the others cannot be split into nuclei, so instance metrics exist only for these.
Each ``<Region>`` is one nucleus, rasterised as its own instance with
``skimage.draw.polygon(rows=Y, cols=X)`` (the same call that made the shared masks); where polygons
overlap, the later one wins, as in the challenge's own instance maps.
"""

from __future__ import annotations

import gzip
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from skimage.draw import polygon as draw_polygon

__all__ = ["ANNOTATION_DIR", "annotated_names", "annotation_mpp", "annotation_path", "read_annotation",
           "read_instances"]

ANNOTATION_DIR = "annotations"
MIN_VERTICES = 3  # a region with fewer vertices has no area (2 such regions in the 13 files)


def _tile_root(data: Path) -> Path:
    """Accept the shared MoNuSeg folder (``train/`` inside) or its ``train/`` folder itself."""
    data = Path(data)
    return data / "train" if (data / "train" / ANNOTATION_DIR).is_dir() else data


def annotation_path(data: Path, name: str) -> Path | None:
    """``NAME.xml.gz`` (or plain ``NAME.xml``) under ``data``'s annotations folder, None if absent."""
    folder = _tile_root(data) / ANNOTATION_DIR
    for cand in (folder / f"{name}.xml.gz", folder / f"{name}.xml"):
        if cand.is_file():
            return cand
    return None


def annotated_names(data: Path) -> set[str]:
    """Names of the tiles that have instance ground truth."""
    folder = _tile_root(data) / ANNOTATION_DIR
    if not folder.is_dir():
        return set()
    return {p.name.split(".xml")[0] for p in folder.iterdir() if ".xml" in p.name}


def _root(path: Path) -> ET.Element:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            return ET.parse(fh).getroot()
    except (ET.ParseError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable ImageScope XML file ({exc})") from None


def _mpp_of(root: ET.Element) -> float | None:
    try:
        value = float(root.attrib.get("MicronsPerPixel", "nan"))
    except ValueError:
        return None
    return value if value > 0 else None


def annotation_mpp(path: str | Path) -> float | None:
    """The file's ``MicronsPerPixel`` (um per tile pixel), None when absent or not a positive number."""
    return _mpp_of(_root(Path(path)))


def _regions(root: ET.Element, path: Path) -> list[np.ndarray]:
    out = []
    for region in root.iter("Region"):
        verts = region.findall("./Vertices/Vertex")
        if len(verts) < MIN_VERTICES:
            continue
        try:
            out.append(np.array([(float(v.attrib["X"]), float(v.attrib["Y"])) for v in verts]))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}: region {region.attrib.get('Id', '?')} has a vertex without "
                             f"numeric X/Y ({exc})") from None
    return out


def read_instances(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """uint32 instance map of ``shape``: region k (file order, from 1) is label k; later over earlier.

    Labels of regions that are entirely overwritten or outside the image do not occur in the map.
    """
    return read_annotation(path, shape)[0]


def read_annotation(path: str | Path, shape: tuple[int, int]) -> tuple[np.ndarray, float | None]:
    """:func:`read_instances` and :func:`annotation_mpp` from one parse of the file (XML is the slow part)."""
    path = Path(path)
    root = _root(path)
    labels = np.zeros(shape, np.uint32)
    for k, xy in enumerate(_regions(root, path), start=1):
        rr, cc = draw_polygon(xy[:, 1], xy[:, 0], shape=shape)
        labels[rr, cc] = k
    return labels, _mpp_of(root)
