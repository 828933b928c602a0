"""Datasets and augmentations on the real shared data."""

import pytest
import torch

from cdal_fast.datasets import make_split, read_split, read_volume_pairs
from cdal_fast.network.config import get_preset
from cdal_fast.sampling.volume import window_starts
from cdal_fast.training.augment import color_jitter, hed_jitter, hsv_to_rgb, random_affine_crop, rgb_to_hsv
from cdal_fast.training.data import CxrData, HippocampusData, MonusegData


def test_monuseg_split_and_shapes(shared_data):
    cfg = get_preset("monuseg")
    val = MonusegData.load(shared_data / "monuseg", cfg, "val")
    assert len(val) == 6 and val.images.shape == (6, 3, 512, 512) and val.masks.shape == (6, 1, 512, 512)
    assert set(val.masks.unique().tolist()) == {-1.0, 1.0}
    frac = (val.masks > 0).float().mean().item()
    assert 0.1 < frac < 0.4  # nuclei cover 11-40 % of a tile (data README)
    train_names = read_split(shared_data / "monuseg" / "train", "train")
    assert len(train_names) == 24 and not set(train_names) & set(val.names)


def test_augmentation_moves_image_and_mask_together():
    """Feed the mask as the image: after the shared geometric transform they must agree."""
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(2, 1, 128, 128, generator=g) > 0.5).float() * 2 - 1
    mask = torch.nn.functional.avg_pool2d(mask, 9, 1, 4).sign()  # smooth blobs
    img = mask.repeat(1, 3, 1, 1)
    out_img, out_mask = random_affine_crop(img, mask, 64, torch.Generator().manual_seed(1))
    assert out_img.shape == (2, 3, 64, 64) and out_mask.shape == (2, 1, 64, 64)
    agree = ((out_img[:, :1] >= 0) == (out_mask > 0)).float().mean().item()
    assert agree > 0.99


def test_color_jitter_and_hsv_round_trip():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g)
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5, rtol=1e-5)
    y = color_jitter(x, torch.Generator().manual_seed(2))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 and not torch.allclose(x, y)
    y2 = color_jitter(x, torch.Generator().manual_seed(2))
    assert torch.equal(y, y2)


def test_batches_deterministic(shared_data):
    cfg = get_preset("tiny")
    data = MonusegData.load(shared_data / "monuseg", cfg, "val", tile_size=128)
    a = data.batch(3, torch.Generator().manual_seed(5))
    b = data.batch(3, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (3, 3, 64, 64)


def test_cxr_loader(shared_data):
    cfg = get_preset("cxr")
    names = read_split(shared_data / "cxr", "val", "train/splits/cxr.json")[:2]
    d = CxrData.load(shared_data / "cxr", cfg, names)
    assert d.images.shape == (2, 1, 256, 256) and d.masks.shape == (2, 1, 256, 256)


def test_hippocampus_loader(shared_data):
    cfg = get_preset("hippocampus")
    pairs = read_volume_pairs(shared_data / "hippocampus")[:1]
    name = pairs[0][0]
    d = HippocampusData.load(shared_data / "hippocampus", cfg, [name])
    assert d.images.shape[1:] == (1, 32, 32) and d.masks.shape[1:] == (3, 32, 32)
    assert d.images.shape[0] % 32 == 0
    onehot = (d.masks > 0).sum(1)
    assert torch.equal(onehot, torch.ones_like(onehot))


def test_window_starts_cover_volume():
    starts = window_starts((35, 50, 32), 32, 8)
    xs = sorted({s[0] for s in starts})
    assert xs == [0, 3] and sorted({s[1] for s in starts}) == [0, 8, 16, 18]


def test_make_split_seeded():
    names = [f"n{i}" for i in range(10)]
    a, b = make_split(names, 0), make_split(list(reversed(names)), 0)
    assert a == b and len(a["val"]) == 2 and not set(a["val"]) & set(a["train"])
    with pytest.raises(FileNotFoundError):
        read_split(__import__("pathlib").Path("/nonexistent"), "val")


def test_hed_jitter_scales_and_shifts_stain_concentrations():
    """Pixels made of known H/E/D amounts come back with each amount scaled and shifted by the draws."""
    stains = torch.tensor([[0.6, 0.3, 0.0], [0.1, 0.8, 0.05]])  # two images, (H, E, D) optical densities
    rgb_from_hed = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])  # Ruifrok & Johnston
    rgb = torch.exp(-(stains @ rgb_from_hed))[:, :, None, None].expand(2, 3, 4, 4).contiguous()
    sigma = 0.1
    draws = torch.Generator().manual_seed(5)
    alpha = (torch.rand(6, generator=draws) * 2 * sigma + 1 - sigma).view(2, 3)
    beta = (torch.rand(6, generator=draws) * 2 * sigma - sigma).view(2, 3)
    expected = torch.exp(-((stains * alpha + beta) @ rgb_from_hed)).clamp(0, 1)
    out = hed_jitter(rgb, torch.Generator().manual_seed(5), sigma)
    assert torch.allclose(out[:, :, 2, 3], expected, atol=1e-5)
    assert not torch.allclose(out, rgb, atol=1e-3)


def test_hed_jitter_off_draws_nothing():
    """sigma 0 returns the input and leaves the generator untouched, so old recipes replay exactly."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, 4, 4)
    assert hed_jitter(x, g, 0.0) is x
    assert torch.equal(torch.rand(2, generator=g), torch.rand(2, generator=torch.Generator().manual_seed(3)))
