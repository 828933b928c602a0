"""Streamed, atomic nucleus outputs: QuPath GeoJSON detections, a CSV table, a GeoParquet table,
the slide summary.

A slide can hold millions of nuclei, so nothing here keeps the collection: each nucleus is written
as it arrives (one GeoJSON Feature per line inside the FeatureCollection's array, one CSV row, one
buffered Parquet row, flushed per row group). The files are written under
:func:`cdal_fast.atomic.atomic_output` names and appear only when the with-block completes; an
error deletes them. The only per-nucleus state kept is its area (8 bytes) for the summary's
quartiles, and the count of each positivity class.

With a stain profile, each row also carries the nucleus's stain measurements
(:func:`cdal_fast.nuclei.stain.stain_columns`); with a positivity rule (H-DAB), its IHC class, which
is also the GeoJSON ``classification`` (so QuPath colours the detections by class).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import uuid
from array import array
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType

import numpy as np

from ..atomic import atomic_output
from .measure import CSV_FIELDS, Nucleus
from .parquet import PARQUET_SUFFIX, ParquetTable
from .stain import (
    CLASS_COLOURS,
    CLASS_NAMES,
    STAT_COUNT,
    PositivityRule,
    StainProfile,
    positivity_summary,
    stain_columns,
)

__all__ = ["GEOJSON_SUFFIX", "CSV_SUFFIX", "PARQUET_SUFFIX", "CLASS_COLUMN", "NucleiWriters", "feature",
           "nuclei_summary", "table_columns"]

GEOJSON_SUFFIX = ".nuclei.geojson"
CSV_SUFFIX = ".nuclei.csv"
CLASS_NAME = "Nucleus"
CLASS_COLOR = [200, 0, 0]  # QuPath's display colour of the class (RGB)
CLASS_COLUMN = "class"  # the IHC class (Negative, 1+, 2+, 3+) in the CSV / Parquet tables
COORD_DECIMALS = 2  # 1/100 level-0 pixel: below any scanner's resolution, keeps files small
VALUE_DECIMALS = 6
UM2_PER_MM2 = 1e6
# Namespace of the feature UUIDs: uuid5(slide name + nucleus id) is stable across reruns.
FEATURE_NAMESPACE = uuid.UUID("7d0c7a52-5a47-4c1e-9a55-3d2f0a6f1b21")
# Measurement names as QuPath shows them (unit in the name, QuPath's own style).
MEASUREMENT_NAMES = {
    "centroid_x_um": "Centroid X um", "centroid_y_um": "Centroid Y um", "area_um2": "Area um^2",
    "perimeter_um": "Perimeter um", "equivalent_diameter_um": "Equivalent diameter um",
    "eccentricity": "Eccentricity", "solidity": "Solidity", "circularity": "Circularity",
    "mean_probability": "Mean probability", "mean_uncertainty": "Mean vote uncertainty",
}


def _num(v: float) -> float | None:
    return None if not math.isfinite(v) else round(float(v), VALUE_DECIMALS)


def feature(n: Nucleus, slide: str, stain_names: list[str] | None = None, class_index: int | None = None) -> dict:
    """One QuPath detection: level-0 pixel Polygon, class Nucleus (or the IHC class ``class_index``),
    measurements (NaN ones left out; ``stain_names`` label the nucleus's stain values)."""
    ring = [[round(x, COORD_DECIMALS), round(y, COORD_DECIMALS)] for x, y in n.polygon]
    measurements = {label: _num(getattr(n, f)) for f, label in MEASUREMENT_NAMES.items()}
    if stain_names:
        measurements.update((label, _num(v)) for label, v in zip(stain_names, n.stain))
    if class_index is None:
        classification = {"name": CLASS_NAME, "color": CLASS_COLOR}
    else:
        classification = {"name": CLASS_NAMES[class_index], "color": list(CLASS_COLOURS[class_index])}
    return {
        "type": "Feature",
        "id": str(uuid.uuid5(FEATURE_NAMESPACE, f"{slide}:{n.id}")),
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "objectType": "detection",
            "classification": classification,
            "isLocked": False,
            "nucleus_id": n.id,
            "measurements": {k: v for k, v in measurements.items() if v is not None},
        },
    }


def table_columns(stain: StainProfile | None, positivity: PositivityRule | None) -> list[tuple[str, str]]:
    """(name, kind) of the CSV / Parquet columns, in order: the shape measurements, the stain
    measurements, the IHC class."""
    cols = [(f, "int" if f == "id" else "float") for f in CSV_FIELDS]
    if stain is not None:
        cols += [(c, "float") for c, _ in stain_columns(stain)]
    if positivity is not None:
        cols.append((CLASS_COLUMN, "str"))
    return cols


class NucleiWriters:
    """Context manager writing ``NAME.nuclei.geojson[.gz]`` and/or ``NAME.nuclei.csv`` as nuclei arrive.

    ``with NucleiWriters(out_dir, name) as w: w.write(labeller.feed(...)); ...`` then
    ``w.summary(tissue_area_um2)`` for the per-slide JSON. ``paths`` lists the files it makes.
    ``stain``: the profile the nuclei's stain values were measured with (adds their columns);
    ``positivity``: classify each nucleus (H-DAB) into Negative / 1+ / 2+ / 3+; ``parquet``: also
    ``NAME.nuclei.parquet`` (needs pyarrow).
    """

    def __init__(self, out_dir: str | Path, name: str, geojson: bool = True, csv_table: bool = True,
                 gzip_geojson: bool = False, stain: StainProfile | None = None,
                 positivity: PositivityRule | None = None, parquet: bool = False) -> None:
        out_dir = Path(out_dir)
        if positivity is not None and (stain is None or stain.names[1] != "DAB"):
            raise ValueError("NucleiWriters: positivity classes need DAB stain measurements (an h-dab profile)")
        self.name = name
        self.paths: list[Path] = []
        self.geojson_path = (out_dir / f"{name}{GEOJSON_SUFFIX}{'.gz' if gzip_geojson else ''}") if geojson else None
        self.csv_path = out_dir / f"{name}{CSV_SUFFIX}" if csv_table else None
        self.parquet_path = out_dir / f"{name}{PARQUET_SUFFIX}" if parquet else None
        self.stain, self.positivity = stain, positivity
        self.columns = table_columns(stain, positivity)
        self._stain_names = [label for _, label in stain_columns(stain)] if stain is not None else None
        self._gzip = gzip_geojson
        self._stack = ExitStack()
        self._geo: io.TextIOBase | None = None
        self._csv = None
        self._table: ParquetTable | None = None
        self._areas = array("d")
        self.class_counts = [0] * len(CLASS_NAMES)
        self._open = False

    @property
    def count(self) -> int:
        return len(self._areas)

    def __enter__(self) -> NucleiWriters:
        stack = self._stack.__enter__()
        if self.geojson_path is not None:
            tmp = stack.enter_context(atomic_output(self.geojson_path))
            raw = gzip.open(tmp, "wt", encoding="utf-8") if self._gzip else open(tmp, "w", encoding="utf-8")
            self._geo = stack.enter_context(raw)
            self._geo.write('{"type": "FeatureCollection", "features": [\n')
            self.paths.append(self.geojson_path)
        if self.csv_path is not None:
            tmp = stack.enter_context(atomic_output(self.csv_path))
            fh = stack.enter_context(open(tmp, "w", encoding="utf-8", newline=""))
            self._csv = csv.writer(fh)
            self._csv.writerow([name for name, _ in self.columns])
            self.paths.append(self.csv_path)
        if self.parquet_path is not None:
            tmp = stack.enter_context(atomic_output(self.parquet_path))
            self._table = ParquetTable(tmp, self.columns)
            stack.push(self._end_table)  # runs before the atomic rename (or deletion) of its file
            self.paths.append(self.parquet_path)
        self._open = True
        return self

    def write(self, nuclei: Iterable[Nucleus]) -> None:
        """Append nuclei (any iterable; consumed once)."""
        if not self._open:
            raise RuntimeError("NucleiWriters.write outside its with-block")
        for n in nuclei:
            values: list = list(n.measurements().values())
            if self.stain is not None:
                if len(n.stain) != STAT_COUNT:
                    raise ValueError(f"NucleiWriters: nucleus {n.id} carries {len(n.stain)} stain values, "
                                     f"{STAT_COUNT} expected (was it measured with a stain profile?)")
                values += n.stain
            cls = None
            if self.positivity is not None:
                cls = self.positivity.classify(n.stain[self.positivity.index])
                self.class_counts[cls] += 1
                values.append(CLASS_NAMES[cls])
            if self._geo is not None:
                self._geo.write((",\n" if self._areas else "") + json.dumps(
                    feature(n, self.name, self._stain_names, cls), separators=(",", ":")))
            if self._csv is not None:
                self._csv.writerow([_csv_value(v) for v in values])
            if self._table is not None:
                self._table.add(values, n.polygon)
            self._areas.append(n.area_um2)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc_type is None and self._geo is not None:
            self._geo.write("\n]}\n")
        self._open = False
        return bool(self._stack.__exit__(exc_type, exc, tb))

    def _end_table(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        """Close the Parquet table (its last row group and the ``geo`` metadata), or abandon it on error."""
        if exc_type is None:
            self._table.close()
        else:
            self._table.abort()
        return False

    def summary(self, tissue_area_um2: float | None) -> dict:
        """Count, density per mm^2 of tissue and area quartiles (see :func:`nuclei_summary`), plus with
        stains the profile used and with positivity the IHC numbers (:func:`stain.positivity_summary`)."""
        out = nuclei_summary(np.frombuffer(self._areas, dtype=np.float64), tissue_area_um2)
        if self.stain is not None:
            out["stain"] = self.stain.to_dict()
        if self.positivity is not None:
            out["positivity"] = positivity_summary(self.class_counts, tissue_area_um2, self.positivity)
        return out


def _csv_value(v: float | int | str) -> str:
    if isinstance(v, (int, str)):
        return str(v)
    return "" if not math.isfinite(v) else f"{v:.{VALUE_DECIMALS}g}"


def nuclei_summary(areas_um2: np.ndarray | Iterable[float], tissue_area_um2: float | None) -> dict:
    """Per-slide numbers: ``nuclei_count``, ``nuclei_per_mm2_tissue`` (None without a tissue area)
    and ``nucleus_area_um2_quartiles`` [Q1, median, Q3] (None without nuclei)."""
    a = np.asarray(list(areas_um2) if not isinstance(areas_um2, np.ndarray) else areas_um2, np.float64)
    if tissue_area_um2 is not None and not tissue_area_um2 >= 0:
        raise ValueError(f"nuclei_summary: tissue area must be >= 0 um^2, got {tissue_area_um2!r}")
    density = None
    if tissue_area_um2:
        density = round(a.size / (tissue_area_um2 / UM2_PER_MM2), 3)
    quart = [round(float(q), 3) for q in np.percentile(a, [25, 50, 75])] if a.size else None
    return {"nuclei_count": int(a.size), "nuclei_per_mm2_tissue": density, "nucleus_area_um2_quartiles": quart}
