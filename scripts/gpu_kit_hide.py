"""The GPU kit's dry run installs this as ``sitecustomize``: packages the lent GPU's image lacks
(``CDAL_KIT_HIDE``, comma-separated import names) can then be imported only from the carried-wheel
target (``CDAL_KIT_SITE``), so the dry run on a fully equipped CPU machine meets the same gaps."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

_HIDDEN = frozenset(n for n in os.environ.get("CDAL_KIT_HIDE", "").split(",") if n)
_SITE = [p for p in os.environ.get("CDAL_KIT_SITE", "").split(os.pathsep) if p]


class _OnlyFromWheelTarget(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 (the import protocol's signature)
        if "." in name or name not in _HIDDEN:
            return None  # submodules follow their package, wherever it came from
        spec = importlib.machinery.PathFinder.find_spec(name, _SITE) if _SITE else None
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r} (the GPU image lacks it: hidden by the kit's dry run)",
                                      name=name)
        return spec


if _HIDDEN:
    sys.meta_path.insert(0, _OnlyFromWheelTarget())
