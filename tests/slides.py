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


def _halve(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    return a[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)


def write_dicom_wsi(folder: Path, rgb: np.ndarray, mpp: float, levels: int = 2, tile: int = 128,
                    image_type: str = "VOLUME") -> Path:
    """A DICOM WSI (VL Whole Slide Microscopy, TILED_FULL, uncompressed RGB), one instance per level.

    Written with pydicom from the attributes the standard (PS3.3 A.32.8) requires for a
    TILED_FULL pyramid, so the test does not depend on a converter.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    sop_class = "1.2.840.10008.5.1.4.1.1.77.1.6"
    pyramid = [rgb]
    for _ in range(levels - 1):
        pyramid.append(_halve(pyramid[-1]))
    for i, a in enumerate(pyramid):
        h, w = a.shape[:2]
        nty, ntx = -(-h // tile), -(-w // tile)
        frames = np.zeros((nty * ntx, tile, tile, 3), dtype=np.uint8)
        for ty in range(nty):
            for tx in range(ntx):
                part = a[ty * tile:(ty + 1) * tile, tx * tile:(tx + 1) * tile]
                frames[ty * ntx + tx, :part.shape[0], :part.shape[1]] = part
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
        ds.Modality, ds.PatientName, ds.PatientID, ds.StudyID = "SM", "TEST^SLIDE", "T1", "1"
        ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
        ds.ContainerIdentifier, ds.DimensionOrganizationType = "SLIDE-1", "TILED_FULL"
        ds.ImageType = ["ORIGINAL" if i == 0 else "DERIVED", "PRIMARY", image_type if i == 0 else "VOLUME",
                        "NONE" if i == 0 else "RESAMPLED"]
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.Rows, ds.Columns, ds.NumberOfFrames = tile, tile, nty * ntx
        ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = h, w
        ds.TotalPixelMatrixFocalPlanes, ds.NumberOfOpticalPaths = 1, 1
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = w * mpp / 1000, h * mpp / 1000
        spacing = mpp * 2**i / 1000  # mm
        measures = Dataset()
        measures.PixelSpacing = [spacing, spacing]
        measures.SliceThickness = 0.001
        shared = Dataset()
        shared.PixelMeasuresSequence = Sequence([measures])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        path = Dataset()
        path.OpticalPathIdentifier = "1"
        ds.OpticalPathSequence = Sequence([path])
        ds.PixelData = frames.tobytes()
        ds.save_as(folder / f"level{i}.dcm", enforce_file_format=True)
    return folder


def write_sparse_pyramid(path: Path, size: int, mpp: float, fragments: list[tuple[int, int, int]],
                         tile: int = 1024, min_side: int = 1024, texture: np.ndarray | None = None) -> Path:
    """A huge white pyramidal OME-TIFF with square tissue ``fragments`` (y, x, side) in level-0 px.

    Written tile by tile as pre-compressed bytes; tiles without tissue are empty (byte count 0, read
    as white), so neither memory nor disk grow with ``size``: a 100000 x 100000 slide is a few MB.
    ``texture``: RGB level-0 pixels to fill the fragments with (their top-left part, subsampled on the
    reduced levels), e.g. a MoNuSeg tile; default a random pink texture.
    """
    import zlib

    rng = np.random.default_rng(0)
    levels, side = [], size
    while True:
        levels.append(side)
        if side <= min_side:
            break
        side = -(-side // 2)
    meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp,
            "PhysicalSizeYUnit": "µm"}

    def tiles(level: int, side: int):
        scale = 2**level
        boxes = [(y // scale, x // scale, max(1, s // scale)) for y, x, s in fragments]
        n = -(-side // tile)
        for ty in range(n):
            for tx in range(n):
                block = None
                for y, x, s in boxes:
                    y0, y1 = max(y, ty * tile), min(y + s, (ty + 1) * tile)
                    x0, x1 = max(x, tx * tile), min(x + s, (tx + 1) * tile)
                    if y1 > y0 and x1 > x0:
                        if block is None:
                            block = np.full((tile, tile, 3), 240, dtype=np.uint8)
                        if texture is None:
                            part = rng.integers(0, 40, (y1 - y0, x1 - x0, 1)) + np.array([170, 90, 160])
                        else:
                            part = texture[(y0 - y) * scale:(y1 - y) * scale:scale,
                                           (x0 - x) * scale:(x1 - x) * scale:scale]
                        block[y0 - ty * tile:y1 - ty * tile, x0 - tx * tile:x1 - tx * tile] = part
                yield b"" if block is None else zlib.compress(block.tobytes(), 1)

    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        for i, side in enumerate(levels):
            kw = dict(shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile), compression="zlib",
                      photometric="rgb")
            if i == 0:
                tw.write(tiles(0, side), subifds=len(levels) - 1, metadata=meta, **kw)
            else:
                tw.write(tiles(i, side), subfiletype=1, metadata=None, **kw)
    return path
