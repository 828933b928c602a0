"""cdal_fast.sampling.decode: hand-computed values, the stored-plane round trip, and the authors' golden decisions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cdal_fast.network.config import get_preset
from cdal_fast.sampling.decode import MaskChannels, object_pixels, prob_to_u8, to_labels, u8_to_mask

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "authors_cdal"
BINARY, THREE = get_preset("tiny"), get_preset("tiny", mask_channels=3)


def test_binary_values_and_stored_plane():
    p = torch.tensor([0.0, 0.25, 0.4999, 0.5, 0.75, 1.0]).reshape(1, 1, 6)
    assert to_labels(p, BINARY).tolist() == [[0, 0, 0, 1, 1, 1]]
    assert prob_to_u8(p, BINARY).tolist() == [[0, 64, 127, 128, 191, 255]]  # round(255 p), 63.75 -> 64
    assert u8_to_mask(prob_to_u8(p, BINARY).numpy(), BINARY).tolist() == [[0, 0, 0, 255, 255, 255]]
    assert object_pixels(prob_to_u8(p, BINARY), BINARY) == 3


def test_stored_plane_decides_like_the_probability_at_the_threshold():
    """A mask read back from the uint8 plane equals to_labels on the probability, also just around 0.5."""
    p = torch.tensor([0.5 - 1e-7, 0.5 - 2e-3, 0.5, 0.5 + 1e-7, 0.5 + 2e-3, 127.5 / 255, 128.5 / 255])
    p = p.reshape(1, 1, -1)
    from_plane = u8_to_mask(prob_to_u8(p, BINARY).numpy(), BINARY) > 0
    assert np.array_equal(from_plane, to_labels(p, BINARY).numpy() > 0)


def test_multiclass_values_and_axes():
    # class 1 wins pixel 0, class 2 pixel 1, class 0 pixel 2
    p = torch.tensor([[0.2, 0.1, 0.5], [0.7, 0.3, 0.4], [0.1, 0.6, 0.1]]).reshape(3, 1, 3)
    assert to_labels(p, THREE).tolist() == [[1, 2, 0]]
    assert to_labels(p[None], THREE).tolist() == [[[1, 2, 0]]]  # a batch decodes alike
    assert prob_to_u8(p, THREE).tolist() == [[1, 2, 0]]  # the plane stores labels
    assert u8_to_mask(np.array([[1, 2, 0]], np.uint8), THREE).tolist() == [[1, 2, 0]]
    vol = p.reshape(3, 1, 1, 3)  # (C, X, Y, Z)
    assert to_labels(vol, THREE, axis=0).reshape(-1).tolist() == [1, 2, 0]
    assert object_pixels(prob_to_u8(p, THREE), THREE) == 2
    assert MaskChannels(3).multiclass and not MaskChannels(1).multiclass


@pytest.mark.parametrize("name", ["monu_small", "lung_small"])
def test_binary_decision_matches_the_authors(name):
    from safetensors.torch import load_file

    io = load_file(GOLDEN / f"{name}.io.safetensors")
    ref = io["sample.mask_round"][:, 0].to(torch.uint8)  # the authors round the vote mean
    assert torch.equal(to_labels(io["sample.vote_mean"], BINARY), ref)


def test_multiclass_decision_matches_the_authors_where_their_rounding_is_one_hot():
    from safetensors.torch import load_file

    io = load_file(GOLDEN / "hippo.io.safetensors")
    rounded = io["sample.mask_round"]  # (1, 3, H, W), per-channel rounding
    one_hot = rounded.sum(1) == 1
    assert one_hot.sum() > 300  # 407 of the 1024 pixels (random weights): enough to compare
    ours = to_labels(io["sample.vote_mean"], THREE)
    assert torch.equal(ours[one_hot], rounded.argmax(1).to(torch.uint8)[one_hot])
