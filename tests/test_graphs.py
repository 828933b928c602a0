"""GraphedSampler's shape logic on the CPU: which captured batch a call runs at, and padding."""

from __future__ import annotations

import pytest
import torch

from cdal_fast.runtime.graphs import capture_batch, pad_batch


def test_tail_batches_reuse_the_smallest_captured_graph_that_holds_them():
    assert capture_batch(8, []) == 8  # first call: capture at its own size
    assert capture_batch(3, [8]) == 8  # a slide's last, smaller batch is padded, not recaptured
    assert capture_batch(3, [4, 8]) == 4
    assert capture_batch(9, [4, 8]) == 9  # larger than any graph: a new capture
    with pytest.raises(ValueError, match="batch must be >= 1, got 0"):
        capture_batch(0, [8])


def test_vote_major_rows_keep_their_vote_and_tile_after_padding():
    votes, capacity = 2, 3  # two tiles per vote, padded to three
    x = torch.tensor([10.0, 11.0, 20.0, 21.0]).view(4, 1)  # row v * B + b holds 10 * (v + 1) + b
    assert pad_batch(x, 0, votes, capacity).view(-1).tolist() == [10, 11, 0, 20, 21, 0]
    z = x.view(1, 4, 1).expand(2, 4, 1)  # (T, V*B, nz): the batch axis is 1
    assert pad_batch(z, 1, votes, capacity)[1].view(-1).tolist() == [10, 11, 0, 20, 21, 0]
    image = torch.tensor([[1.0], [2.0]])
    assert pad_batch(image, 0, 1, capacity).view(-1).tolist() == [1, 2, 0]
    assert pad_batch(image, 0, 1, 2) is image  # full batches are not copied


def test_padding_refuses_shapes_it_cannot_honour():
    with pytest.raises(ValueError, match="not a multiple of 2 votes"):
        pad_batch(torch.zeros(3, 1), 0, 2, 4)
    with pytest.raises(ValueError, match="cannot pad a batch of 4 down to 2"):
        pad_batch(torch.zeros(4, 1), 0, 1, 2)
