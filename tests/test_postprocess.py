"""Binary-mask clean-up swept on validation (cdal_fast.sampling.postprocess), on hand-drawn masks."""

from __future__ import annotations

import numpy as np
import pytest

from cdal_fast.sampling.postprocess import PostProcess, postprocess_mask

# 0 background, 1 object. A ring with a 1-px hole (top left), a ring with a 4-px hole (right),
# a lone pixel (bottom left) and a background notch open to the border (bottom right, not a hole).
DRAWING = """
1110000000
1010001111
1110001001
0000001001
0000001111
0000000000
1000000011
0000000010
0000000011
"""


def _mask() -> np.ndarray:
    return np.array([[c == "1" for c in row] for row in DRAWING.split()], dtype=bool)


def test_holes_up_to_the_size_are_filled_and_border_background_is_not():
    m = _mask()
    one = postprocess_mask(m, PostProcess(fill_holes_px=1))
    assert one[1, 1] and not one[2, 7:9].any()  # the 1-px hole filled, the 4-px one kept
    four = postprocess_mask(m, PostProcess(fill_holes_px=4))
    assert four[2:4, 7:9].all()
    assert not four[7, 9] and four.sum() == m.sum() + 1 + 4  # the notch touches the border: untouched


def test_objects_below_the_size_are_removed():
    m = _mask()
    out = postprocess_mask(m, PostProcess(min_object_px=2))
    assert not out[6, 0] and out.sum() == m.sum() - 1  # only the lone pixel goes
    # 8-connectivity: a diagonal pair is one 2-px object and survives min_object_px=2
    diag = np.zeros((3, 3), bool)
    diag[0, 0] = diag[1, 1] = True
    assert postprocess_mask(diag, PostProcess(min_object_px=2)).sum() == 2
    assert postprocess_mask(diag, PostProcess(min_object_px=3)).sum() == 0


def test_plain_settings_change_nothing():
    m = _mask()
    assert np.array_equal(postprocess_mask(m, PostProcess()), m)
    with pytest.raises(ValueError, match=r"one 2D mask, got shape \(1, 9, 10\)"):
        postprocess_mask(m[None], PostProcess())
