"""The adaptive-vote stopping rule (issue 33, lever 2), kept as maths apart from any runner.

Votes are independent samples of a pixel's probability, so after k votes the running mean has a
standard error of ``std_k / sqrt(k)``. A pixel is *unsettled* while the decision threshold lies
within ``c`` standard errors of its running mean: one more vote could still flip its mask value. A
tile may stop after ``k >= min_votes`` votes once at most a fraction ``p`` of its pixels is
unsettled. Measured on the MoNuSeg validation tiles (``bench/adaptive_votes.py``), no rule saved
votes without losing more Dice than the accuracy rule allows, so nothing samples adaptively by
default; the rule is here so that the study and any later runner decide the same way.
"""

from __future__ import annotations

import torch

__all__ = ["MIN_VOTES", "unsettled_fraction", "votes_needed"]

MIN_VOTES = 2  # a spread needs two votes


def unsettled_fraction(votes: torch.Tensor, threshold: float, c: float) -> float:
    """Fraction of pixels of ``votes`` (k, ...) whose threshold is within ``c`` standard errors of the mean."""
    k = votes.shape[0]
    if k < MIN_VOTES:
        raise ValueError(f"the rule needs at least {MIN_VOTES} votes, got {k}")
    se = votes.std(dim=0, unbiased=True) / k ** 0.5
    return float(((votes.mean(0) - threshold).abs() < c * se).float().mean())


def votes_needed(votes: torch.Tensor, threshold: float, c: float, p: float, min_votes: int = MIN_VOTES) -> int:
    """The first k in [min_votes, len(votes)] after which at most ``p`` of the pixels are unsettled
    (all votes when none is): how many of the ``votes`` (V, ...) drawn in order a tile would have used."""
    if not (c >= 0 and 0 <= p <= 1):
        raise ValueError(f"c must be >= 0 and p in [0, 1], got c={c}, p={p}")
    total = votes.shape[0]
    for k in range(max(MIN_VOTES, min_votes), total + 1):
        if unsettled_fraction(votes[:k], threshold, c) <= p:
            return k
    return total
