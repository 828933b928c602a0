"""Optional features: which extra of ``pip install 'cdal-fast[EXTRA]'`` installs the package each needs.

The core install (pyproject.toml's ``dependencies``) segments TIFF (uncompressed, zlib, LZMA, Zstandard,
PackBits), PNG and JPEG images with the CPU's fastest backend. Everything else is an extra, and every
module still imports without it: the import happens when the feature is used, through
:func:`import_extra`, which fails with the one ``pip install`` line that fixes it. The table here
and ``[project.optional-dependencies]`` are checked against each other by the tests.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

__all__ = ["EXTRA_OF", "MissingExtraError", "install_hint", "import_extra"]

# module imported at use -> the extra that installs it
EXTRA_OF: dict[str, str] = {
    "imagecodecs": "codecs",  # TIFF compressed with JPEG, LZW, JPEG 2000, WebP, PNG ...
    "openslide": "openslide",  # SVS, NDPI, MRXS and the other vendor formats
    "pydicom": "dicom",  # DICOM whole-slide images (header checks; pixels through OpenSlide)
    "nibabel": "nifti",  # NIfTI volumes: the hippocampus model, its evaluation and training
    "ray": "ray",  # segment --ray
    "pyarrow": "parquet",  # segment --nuclei-parquet
}


class MissingExtraError(ImportError):
    """An optional feature was used without the extra that installs what it needs."""


def install_hint(extra: str) -> str:
    """The command that installs ``extra`` (quoted for shells that expand brackets)."""
    return f"pip install 'cdal-fast[{extra}]'"


def import_extra(module: str, feature: str, error: Callable[[str], Exception] = MissingExtraError) -> ModuleType:
    """Import ``module`` for ``feature`` or raise ``error`` naming the extra that installs it.

    ``error`` lets callers keep their own error type (an unreadable slide stays a ``SlideError``).
    A module that is installed but fails to load (a missing shared library) reports why as well.
    """
    try:
        return importlib.import_module(module)
    except (ImportError, OSError) as exc:
        extra = EXTRA_OF[module.split(".")[0]]
        cause = "" if isinstance(exc, ModuleNotFoundError) else f" (it did not load: {exc})"
        raise error(f"{feature} needs the {module.split('.')[0]} package{cause}: {install_hint(extra)}") from None
