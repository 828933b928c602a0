"""The one error type of the slide readers, apart so that every reader module can raise it."""

from __future__ import annotations

__all__ = ["SlideError"]


class SlideError(RuntimeError):
    """A slide cannot be opened or read; the message says why and what to do."""
