"""Reading and resizing small images and masks (TIFF through tifffile, PNG/JPEG through Pillow).

Shared by inference (`segment`, `eval`) and the training data package, so it lives outside `data/`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..extras import EXTRA_OF, install_hint

__all__ = ["read_image", "read_mask", "resize_image", "resize_mask", "IMAGE_SUFFIXES", "ImageReadError",
           "undecodable_tiff"]

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


class ImageReadError(RuntimeError):
    """A file could not be decoded as an image."""


def undecodable_tiff(compression: int) -> str | None:
    """Why tifffile cannot decode TIFF ``compression`` here, naming the extra when that is the cause (None: it can).

    Without imagecodecs tifffile decodes only uncompressed, zlib/deflate, LZMA, Zstandard and PackBits
    data; scanners' TIFFs are often JPEG, LZW or JPEG 2000. Checked when a file is opened, so that
    the user reads one line with the fix, not a decoder's KeyError in the middle of a run.
    """
    import tifffile

    if compression in tifffile.TIFF.DECOMPRESSORS:
        return None
    try:
        name = tifffile.COMPRESSION(compression).name
    except ValueError:
        name = f"code {compression}"
    if importlib.util.find_spec("imagecodecs") is None:
        return f"its {name} compression needs the imagecodecs package: {install_hint(EXTRA_OF['imagecodecs'])}"
    return f"tifffile cannot decode its {name} compression"


def read_image(path: str | Path) -> np.ndarray:
    """Return an (H, W, C) uint8 array; greyscale files come back with C = 1."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                if (why := undecodable_tiff(tif.pages[0].compression)) is not None:
                    raise ImageReadError(f"cannot read image {path}: {why}")
                arr = tif.asarray(key=0)
        else:
            from PIL import Image

            with Image.open(path) as im:
                if im.mode not in ("L", "RGB"):
                    im = im.convert("RGB")
                arr = np.asarray(im)
    except ImageReadError:
        raise
    except Exception as exc:  # decoders raise many types; name the file and the cause
        raise ImageReadError(f"cannot read image {path}: {exc}") from exc
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ImageReadError(f"{path}: expected a 2D image, got array of shape {arr.shape}")
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        raise ImageReadError(f"{path}: expected 8-bit pixels, got {arr.dtype}")
    return np.ascontiguousarray(arr)


def read_mask(path: str | Path) -> np.ndarray:
    """Return an (H, W) bool array (any non-zero pixel is foreground)."""
    arr = read_image(path)
    return arr[:, :, 0] > 0


def resize_image(chw: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Anti-aliased bilinear resize of a (C, H, W) float tensor."""
    hw = (size, size) if isinstance(size, int) else size
    if tuple(chw.shape[-2:]) == tuple(hw):
        return chw
    return F.interpolate(chw[None], size=hw, mode="bilinear", antialias=True, align_corners=False)[0]


def resize_mask(mask: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Area-resample a binary (H, W) mask and threshold at 0.5 (keeps thin structures fair)."""
    hw = (size, size) if isinstance(size, int) else size
    if tuple(mask.shape[-2:]) == tuple(hw):
        return mask.bool()
    m = F.interpolate(mask.float()[None, None], size=hw, mode="area" if hw[0] <= mask.shape[0] else "bilinear")
    return m[0, 0] >= 0.5
