"""Whole-slide segmentation: read, tile, batch, sample, stitch, write."""

from .readers import SlideError, SlideReader, open_slide

__all__ = ["SlideError", "SlideReader", "open_slide"]
