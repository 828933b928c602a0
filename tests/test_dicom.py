"""DICOM WSI input (OpenSlide 4), discovery of DICOM folders, and the mpp fallbacks."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile

from cdal_fast.network.config import get_preset
from cdal_fast.wsi.batch import find_inputs
from cdal_fast.wsi.mpp import settle_mpp
from cdal_fast.wsi.pipeline import make_plan
from cdal_fast.wsi.readers import DicomSlide, SlideError, TiffSlide, open_slide

from .slides import write_dicom_wsi, write_ome_pyramid

pytest.importorskip("openslide")


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)  # not a multiple of the 128-px DICOM tiles
    img[100:200, 50:300] = (180, 60, 170)
    return img


def test_dicom_matches_ome_tiff_pixel_for_pixel(tmp_path, pixels):
    folder = write_dicom_wsi(tmp_path / "slide1", pixels, mpp=0.25, levels=2)
    ome = write_ome_pyramid(tmp_path / "same.ome.tif", pixels, mpp=0.25, levels=2)
    with open_slide(folder) as d, TiffSlide(ome) as t, open_slide(folder / "level0.dcm") as single:
        assert isinstance(d, DicomSlide) and isinstance(single, DicomSlide)
        assert [(lv.width, lv.height, lv.downsample) for lv in d.levels] == [(420, 300, 1.0), (210, 150, 2.0)]
        assert [(lv.width, lv.height) for lv in d.levels] == [(lv.width, lv.height) for lv in t.levels]
        assert d.mpp == pytest.approx(0.25) and d.mpp_source == "DICOM PixelSpacing" and d.mpp_warning is None
        for level in (0, 1):
            lv = d.levels[level]
            assert np.array_equal(d.read_region(level, 0, 0, lv.width, lv.height),
                                  t.read_region(level, 0, 0, lv.width, lv.height))
        edge = d.read_region(0, 400, 290, 40, 20)
        assert np.array_equal(edge[:10, :20], pixels[290:, 400:]) and (edge[10:] == 255).all()
        assert np.array_equal(single.read_region(0, 10, 20, 50, 40), pixels[20:60, 10:60])


def test_dicom_folder_is_one_input(tmp_path, pixels):
    root = tmp_path / "batch"
    root.mkdir()
    write_dicom_wsi(root / "caseA", pixels, mpp=0.5, levels=2)
    write_ome_pyramid(root / "other.ome.tif", pixels, mpp=0.5, levels=1)
    assert find_inputs([root / "caseA"]) == [root / "caseA"]  # named DICOM folder: one slide
    assert find_inputs([root], recursive=True) == [root / "caseA", root / "other.ome.tif"]
    assert find_inputs([root / "caseA" / "level1.dcm"]) == [root / "caseA" / "level1.dcm"]


def test_not_a_slide_is_a_clear_error(tmp_path, pixels):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ct = tmp_path / "ct"
    ct.mkdir()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, meta.MediaStorageSOPClassUID, generate_uid()
    ds.Modality, ds.SeriesInstanceUID = "CT", generate_uid()
    ds.save_as(ct / "IM0001", enforce_file_format=True)  # no suffix: found by the DICM magic
    ct_sop = r"IM0001: SOP class 1\.2\.840\.10008\.5\.1\.4\.1\.1\.2 \(CT"
    with pytest.raises(SlideError, match=r"not a DICOM whole-slide image.*" + ct_sop):
        open_slide(ct)
    two = tmp_path / "two"
    write_dicom_wsi(two, pixels, mpp=0.5, levels=1)
    shutil.move(two / "level0.dcm", two / "a.dcm")
    write_dicom_wsi(two, pixels, mpp=0.5, levels=1)
    with pytest.raises(SlideError, match="holds 2 slides"):
        open_slide(two)
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(SlideError, match="holds none"):
        open_slide(plain)


def test_mpp_fallbacks(tmp_path):
    assert settle_mpp(None, None, "x", 40).mpp == pytest.approx(0.25)
    info = settle_mpp(None, None, "none", 20, "openslide.objective-power")
    assert info.mpp == pytest.approx(0.5) and "20x" in info.warning and info.source.endswith("20x")
    assert settle_mpp(0.25, 0.2501, "m").anisotropic is None
    assert settle_mpp(0.25, 0.5, "m").anisotropic == (0.25, 0.5)
    assert settle_mpp(None, None, "none").mpp is None
    # a TIFF that records only the objective (SVS-style AppMag), and one with anisotropic pixels
    img = np.full((64, 64, 3), 200, dtype=np.uint8)
    tifffile.imwrite(tmp_path / "mag.tif", img, description="Aperio Image Library|AppMag = 40", photometric="rgb")
    with open_slide(tmp_path / "mag.tif") as s:
        assert s.mpp == pytest.approx(0.25) and "40x" in s.mpp_warning
        plan = make_plan(s, get_preset("tiny"), None)
        assert plan.mpp_warning == s.mpp_warning
    tifffile.imwrite(tmp_path / "aniso.tif", img, photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.5),
                     resolutionunit="CENTIMETER")
    with open_slide(tmp_path / "aniso.tif") as s:
        assert s.mpp_anisotropic == pytest.approx((0.25, 0.5))
        with pytest.raises(SlideError, match=r"anisotropic pixels \(0\.25 x 0\.5 um/px.*--mpp"):
            make_plan(s, get_preset("tiny"), None)
        stated = make_plan(s, get_preset("tiny"), 0.3)
        assert stated.mpp0 == 0.3 and stated.mpp_warning is None
