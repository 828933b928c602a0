"""Nuclei as objects: instance separation, band-wise slide labelling, measurements, writers.

Modules, one job each:

* :mod:`.params`: :class:`NucleiParams`, the validated post-processing parameters.
* :mod:`.separate`: :func:`label_nuclei`, marker-controlled watershed on the vote-mean probability.
* :mod:`.measure`: :func:`measure_objects`, per-nucleus measurements (:class:`Nucleus`).
* :mod:`.bands`: :class:`BandLabeller`, bounded-memory labelling of a slide fed band by band.
* :mod:`.stain`: colour deconvolution, per-nucleus stain statistics, IHC positivity, Macenko.
* :mod:`.writers`: streamed, atomic GeoJSON / CSV / GeoParquet (:mod:`.parquet`) writers and the
  per-slide summary.
* :mod:`.groundtruth`: MoNuSeg XML polygons rasterised as instances.

The slide pipeline's post-process stage feeds its maps to :class:`BandLabeller` and the finished
objects to :class:`NucleiWriters`; plain images use :func:`label_image` (one band).
"""

from importlib import import_module

# Imported on first use (PEP 562): scikit-image and shapely cost seconds to import, and evaluate.py
# only needs the ground-truth reader and the metrics on most paths.
_EXPORTS = {
    "BandLabeller": "bands", "label_image": "bands", "Nucleus": "measure", "Grid": "measure",
    "measure_objects": "measure", "NucleiParams": "params", "label_nuclei": "separate",
    "NucleiWriters": "writers", "nuclei_summary": "writers", "StainProfile": "stain", "PositivityRule": "stain",
    "default_profile": "stain", "estimate_macenko": "stain", "normalise_stains": "stain",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
