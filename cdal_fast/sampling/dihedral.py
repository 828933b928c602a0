"""The 8 symmetries of the square (dihedral group D4) on the last two axes, for test-time augmentation.

Test-time augmentation (TTA) gives vote ``v`` the tile under transform ``d_v`` and maps its sample
back with the inverse before the votes are averaged: the votes are independent samples anyway, so
this costs no extra denoising forwards. The fixed, documented order of the codes is

    0 identity, 1 rot90, 2 rot180, 3 rot270, 4 hflip, 5 hflip then rot90, 6 vflip, 7 hflip then rot270

where ``rotK`` turns counter-clockwise by K quarter turns (``torch.rot90(x, K, (-2, -1))``), ``hflip``
mirrors left-right (the width axis) and ``vflip`` (= hflip then rot180) mirrors top-bottom. Code ``d``
is ``rot(d % 4) . hflip^(d // 4)``.

Codes 1, 3, 5 and 7 swap height and width; a non-square tile uses only the shape-keeping codes
(:data:`SHAPE_KEEPING`), in that order. Vote ``v`` takes entry ``v mod len(order)`` of its order.

Everything here is plain ``flip`` / ``transpose`` on static integer codes, so it scripts with
TorchScript, traces into ONNX (``Transpose`` and negative-step ``Slice``) and exports with torch.export.
"""

from __future__ import annotations

import torch

__all__ = ["DIHEDRAL_ORDER", "SHAPE_KEEPING", "NUM_DIHEDRAL", "vote_codes", "apply_dihedral", "invert_dihedral"]

NUM_DIHEDRAL = 8
QUARTER_TURNS = 4
DIHEDRAL_ORDER = tuple(range(NUM_DIHEDRAL))  # square tiles
SHAPE_KEEPING = tuple(range(0, NUM_DIHEDRAL, 2))  # identity, rot180, hflip, vflip: keep an H != W shape


def vote_codes(votes: int, square: bool) -> list[int]:
    """The transform code of each vote: ``order[v % len(order)]`` of the square or shape-keeping order."""
    # literals: TorchScript reads no module globals (tests check them against the constants above)
    order = [0, 1, 2, 3, 4, 5, 6, 7] if square else [0, 2, 4, 6]
    return [order[v % len(order)] for v in range(votes)]


def _rot90(x: torch.Tensor, turns: int) -> torch.Tensor:
    """Counter-clockwise quarter turns over the last two axes (as ``torch.rot90(x, turns, (-2, -1))``)."""
    turns = turns % 4  # QUARTER_TURNS (TorchScript reads no module globals)
    if turns == 1:
        return x.flip(-1).transpose(-2, -1)
    if turns == 2:
        return x.flip(-2).flip(-1)
    if turns == 3:
        return x.transpose(-2, -1).flip(-1)
    return x


def apply_dihedral(x: torch.Tensor, code: int) -> torch.Tensor:
    """``x`` (..., H, W) under transform ``code``: the horizontal flip first when ``code >= 4``, then the turns."""
    if code >= 4:  # QUARTER_TURNS
        x = x.flip(-1)
    return _rot90(x, code)


def invert_dihedral(x: torch.Tensor, code: int) -> torch.Tensor:
    """The inverse of :func:`apply_dihedral` for ``code``: undo the turns, then the flip."""
    x = _rot90(x, 4 - code % 4)  # QUARTER_TURNS
    if code >= 4:
        x = x.flip(-1)
    return x
