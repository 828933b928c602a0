"""Image reading for the training data package; the code lives in :mod:`cdal_fast.imageio`.

Kept as a name so ``cdal_fast.data.imageio`` imports keep working: inference (``segment``) reads
and resizes images without importing the training data package.
"""

from ..imageio import IMAGE_SUFFIXES, ImageReadError, read_image, read_mask, resize_image, resize_mask

__all__ = ["read_image", "read_mask", "resize_image", "resize_mask", "IMAGE_SUFFIXES", "ImageReadError"]
