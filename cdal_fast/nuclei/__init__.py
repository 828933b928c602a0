"""Nuclei as objects: instance separation, band-wise slide labelling, measurements, writers.

Modules, one job each:

* :mod:`.params`: :class:`NucleiParams`, the validated post-processing parameters.
* :mod:`.separate`: :func:`label_nuclei`, marker-controlled watershed on the vote-mean probability.
* :mod:`.measure`: :func:`measure_objects`, per-nucleus measurements (:class:`Nucleus`).
* :mod:`.bands`: :class:`BandLabeller`, bounded-memory labelling of a slide fed band by band.
* :mod:`.writers`: streamed, atomic GeoJSON / CSV writers and the per-slide summary.
* :mod:`.groundtruth`: MoNuSeg XML polygons rasterised as instances.

The slide pipeline's post-process stage feeds its maps to :class:`BandLabeller` and the finished
objects to :class:`NucleiWriters`; plain images use :func:`label_image` (one band).
"""

from .bands import BandLabeller, label_image
from .measure import Nucleus, measure_objects
from .params import NucleiParams
from .separate import label_nuclei
from .writers import NucleiWriters, nuclei_summary

__all__ = ["BandLabeller", "Nucleus", "NucleiParams", "NucleiWriters", "label_image", "label_nuclei",
           "measure_objects", "nuclei_summary"]
