"""Tissue detection: scikit-image rewrite unchanged on the test slides, small fragments on huge slides."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from cdal_fast.network.config import get_preset
from cdal_fast.wsi.pipeline import make_plan, tiles_to_sample
from cdal_fast.wsi.readers import open_slide
from cdal_fast.wsi.tiling import TileGrid
from cdal_fast.wsi.tissue import detect_tissue, max_detection_mpp, otsu_threshold, tissue_mask

from .slides import write_sparse_pyramid
from .test_segment import mosaic, slide  # noqa: F401  (fixtures)

SAMPLE = Path(__file__).resolve().parents[1] / "cdal_fast" / "samples" / "sample_ihc.ome.tif"


def _digest(mask: np.ndarray) -> tuple[str, int]:
    return hashlib.sha256(np.packbits(mask).tobytes()).hexdigest()[:16], int(mask.sum())


def test_tissue_unchanged_on_test_slides(mosaic, slide):  # noqa: F811
    """Digests of the masks the hand-written scipy detector produced before the scikit-image rewrite."""
    assert _digest(tissue_mask(mosaic)) == ("a6678e619da2a94b", 462951)
    with open_slide(slide) as s:
        det = detect_tissue(s, s.mpp)
        assert det.downsample == 4.0 and det.mpp == pytest.approx(1.0)
        assert _digest(det.mask) == ("923b13ebcf75f379", 28463)
    with open_slide(SAMPLE) as s:
        det = detect_tissue(s, s.mpp)
        assert _digest(det.mask) == ("faa8ea0543f8cf79", 36582)


def test_otsu_and_parameters():
    assert otsu_threshold(np.array([10] * 50 + [200] * 50, dtype=np.uint8)) in range(10, 200)
    rgb = np.full((200, 200, 3), 245, dtype=np.uint8)
    rgb[20:60, 20:60] = (200, 150, 190)  # saturation 63
    rgb[100:190, 100:190] = (200, 100, 180)  # saturation 127
    assert tissue_mask(rgb, min_object_px=1)[40, 40]
    assert not tissue_mask(rgb, threshold=80, min_object_px=1)[40, 40]  # threshold above the faint square
    assert not tissue_mask(rgb, min_object_px=1601)[40, 40]  # 40 x 40 = 1600 px is below the minimum
    assert tissue_mask(rgb, min_object_px=1600)[40, 40]
    assert max_detection_mpp(2500) == pytest.approx(10.0)


def test_small_fragments_on_a_huge_slide_are_planned(tmp_path):
    """The issue's case: 100000^2 px at 0.25 um/px with three 1000^2 px fragments (250 um each)."""
    frags = [(10_000, 20_000, 1000), (50_000, 50_000, 1000), (90_000, 7_000, 1000)]
    path = write_sparse_pyramid(tmp_path / "huge.ome.tif", 100_000, 0.25, frags)
    assert path.stat().st_size < 20e6
    cfg = get_preset("monuseg")  # 256-px tiles at 0.5 um/px; only the config is used
    with open_slide(path) as s:
        plan = make_plan(s, cfg, None)
        grid = TileGrid(plan.work_h, plan.work_w, cfg.image_size, cfg.image_size // 4)
        det = detect_tissue(s, plan.mpp0, 2048)
        tiles = tiles_to_sample(grid, [], det.mask, det.downsample, plan.work_to_level0)
    assert det.mpp <= max_detection_mpp(det.min_area_um2)
    f = plan.mpp0 / plan.work_mpp  # level-0 px -> working px
    for y, x, side in frags:
        cy, cx = (y + side / 2) * f, (x + side / 2) * f
        assert any(t.y <= cy < t.y + grid.tile and t.x <= cx < t.x + grid.tile for t in tiles), (y, x)
    # only tiles near the fragments: each 500-px (working) fragment touches a few 256-px tiles
    assert 3 <= len(tiles) <= 3 * 36


def test_fill_holes_matches_scipy():
    from scipy import ndimage

    from cdal_fast.wsi.tissue import _fill_holes

    rng = np.random.default_rng(1)
    for p in (0.3, 0.5, 0.7):
        m = rng.random((120, 90)) < p
        assert np.array_equal(_fill_holes(m), ndimage.binary_fill_holes(m))


def test_an_image_without_glass_is_all_tissue(shared_data):
    """Two MoNuSeg tiles side by side, one densely and one palely stained, no glass: Otsu's threshold
    falls between the two stains (it dropped 10 of 25 tiles of such a mosaic); the detector must keep both."""
    from cdal_fast.sampling.imageio import read_image
    from cdal_fast.wsi.tissue import GLASS_MEDIAN_MAX, MIN_SATURATION, automatic_threshold, saturation

    images = shared_data / "monuseg" / "train" / "images"
    dense, pale = (read_image(next(images.glob(f"{n}*")))[::4, ::4, :3]
                   for n in ("TCGA-49-4488", "TCGA-CH-5767"))
    both = np.concatenate([dense, pale], axis=1)
    sat = saturation(both)
    otsu = otsu_threshold(sat)
    assert np.median(sat[sat <= otsu]) > GLASS_MEDIAN_MAX  # Otsu split tissue from tissue here
    assert automatic_threshold(sat) == MIN_SATURATION
    kept, by_otsu = tissue_mask(both, min_object_px=25).mean(), tissue_mask(both, otsu, min_object_px=25).mean()
    assert kept > 0.9 and by_otsu < kept - 0.1, (kept, by_otsu)  # (the image border erodes a little)
    # with glass beside the tissue, Otsu's threshold stands and the glass is background
    glass = np.full_like(pale, 236)
    with_glass = np.concatenate([pale, glass], axis=1)
    mask = tissue_mask(with_glass, min_object_px=25)
    assert automatic_threshold(saturation(with_glass)) > MIN_SATURATION
    assert mask[:, pale.shape[1] + 8:].mean() < 0.01 and mask[:, : pale.shape[1]].mean() > 0.7
