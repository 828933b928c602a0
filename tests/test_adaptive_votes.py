"""The adaptive-vote stopping rule (cdal_fast.sampling.adaptive): when a tile may stop drawing votes."""

from __future__ import annotations

import pytest
import torch

from cdal_fast.sampling.adaptive import unsettled_fraction, votes_needed

THRESHOLD = 0.4


def test_votes_that_agree_far_from_the_threshold_stop_at_two():
    votes = torch.full((5, 8, 8), 0.9) + 0.01 * torch.arange(5.0).view(5, 1, 1)
    assert unsettled_fraction(votes[:2], THRESHOLD, c=3.0) == 0.0
    assert votes_needed(votes, THRESHOLD, c=3.0, p=0.0) == 2


def test_votes_that_straddle_the_threshold_never_stop_early():
    votes = torch.tensor([0.1, 0.7, 0.2, 0.6, 0.3]).view(5, 1, 1).expand(5, 4, 4)
    assert unsettled_fraction(votes[:2], THRESHOLD, c=1.0) == 1.0
    assert votes_needed(votes, THRESHOLD, c=1.0, p=0.5) == 5  # all votes: the rule never settled


def test_the_fraction_allowed_and_the_minimum_decide_the_stop():
    # half the pixels settled from the second vote on (0.9, 0.91 ...), half undecided until the fourth
    settled = 0.9 + 0.01 * torch.arange(5.0)
    undecided = torch.tensor([0.1, 0.7, 0.38, 0.42, 0.41])  # the spread shrinks as votes come in
    votes = torch.stack([settled, undecided], dim=1)  # (5 votes, 2 pixels)
    assert votes_needed(votes, THRESHOLD, c=1.0, p=0.5) == 2  # half unsettled is allowed
    assert votes_needed(votes, THRESHOLD, c=1.0, p=0.0, min_votes=3) == 5
    assert votes_needed(votes, THRESHOLD, c=1.0, p=0.5, min_votes=4) == 4
    with pytest.raises(ValueError, match="at least 2 votes"):
        unsettled_fraction(votes[:1], THRESHOLD, c=1.0)
    with pytest.raises(ValueError, match="p in"):
        votes_needed(votes, THRESHOLD, c=1.0, p=1.5)
