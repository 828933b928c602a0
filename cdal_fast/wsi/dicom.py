"""DICOM whole-slide images (VL Whole Slide Microscopy Image Storage) through OpenSlide 4.

A DICOM slide is a series of instances, usually one file per pyramid level plus label/overview
images, in one folder. The folder (or any ``.dcm`` file of it) is one input. The headers are
checked with pydicom first so that a series that is not a slide (a CT, a secondary capture) or a
folder mixing several slides gets a specific error instead of OpenSlide's generic one; pixels,
levels and the resolution (from the Pixel Spacing of the pixel-measures functional group) then come
from OpenSlide's DICOM reader (``readers.DicomSlide``), the same C library that reads the vendor
formats. This module holds only the header checks, so the readers can import it.

Why OpenSlide and not wsidicom: OpenSlide 4 decodes the tiles in C (JPEG, JPEG 2000, uncompressed),
is already the reader for SVS/NDPI/MRXS (one code path for levels, white outside the scan, mpp),
and each tile-reading worker process opens it in milliseconds; wsidicom is pure Python, parses
every instance with pydicom on open and would be a second pixel path to keep in step.
"""

from __future__ import annotations

from pathlib import Path

from ..extras import import_extra
from .errors import SlideError

__all__ = ["WSI_SOP_CLASS", "is_dicom_file", "is_dicom_folder", "dicom_files", "level0_instance"]

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
DICOM_SUFFIX = ".dcm"
_PREAMBLE = 128  # DICOM Part 10 files: 128-byte preamble, then b"DICM"


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` file, or any file with the DICOM Part 10 magic (many archives drop the suffix)."""
    if not path.is_file() or path.name.startswith("."):
        return False
    if path.name.lower().endswith(DICOM_SUFFIX):
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(_PREAMBLE)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM instances directly inside ``folder`` (sorted)."""
    return sorted(f for f in folder.iterdir() if is_dicom_file(f))


def is_dicom_folder(folder: Path) -> bool:
    return folder.is_dir() and any(is_dicom_file(f) for f in folder.iterdir())


def level0_instance(path: Path) -> Path:
    """Check the series is one whole-slide image; return its full-resolution instance."""
    pydicom = import_extra("pydicom", f"{path}: reading DICOM slides", SlideError)
    files = dicom_files(path.parent if path.is_file() else path)  # OpenSlide reads the series from the folder
    if not files:
        raise SlideError(f"{path}: no DICOM files in the folder")
    series = None
    if path.is_file():  # a named instance picks its own series among the folder's
        try:
            series = str(pydicom.dcmread(path, stop_before_pixels=True).get("SeriesInstanceUID", ""))
        except Exception as exc:
            raise SlideError(f"{path}: not a readable DICOM file ({exc})") from exc
    volumes: dict[str, list[tuple[int, Path]]] = {}
    others: list[str] = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as exc:
            raise SlideError(f"{f}: not a readable DICOM file ({exc})") from exc
        sop = str(ds.get("SOPClassUID", ""))
        if sop != WSI_SOP_CLASS:
            others.append(f"{f.name}: SOP class {sop or '?'} ({getattr(ds.get('SOPClassUID'), 'name', 'unknown')})")
            continue
        if series is not None and str(ds.get("SeriesInstanceUID", "")) != series:
            continue
        image_type = [str(v).upper() for v in ds.get("ImageType", [])]
        if len(image_type) > 2 and image_type[2] == "VOLUME":
            pixels = int(ds.get("TotalPixelMatrixColumns", 0)) * int(ds.get("TotalPixelMatrixRows", 0))
            volumes.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((pixels, f))
    if not volumes:
        detail = "; ".join(others[:3]) or "no VOLUME instances (only label/overview images)"
        raise SlideError(f"{path}: not a DICOM whole-slide image (VL Whole Slide Microscopy, SOP class "
                         f"{WSI_SOP_CLASS}, with VOLUME instances expected): {detail}")
    if len(volumes) > 1:
        raise SlideError(f"{path}: the folder holds {len(volumes)} slides (series {', '.join(sorted(volumes))}); "
                         "put each slide's instances in a folder of its own")
    return max(next(iter(volumes.values())))[1]
