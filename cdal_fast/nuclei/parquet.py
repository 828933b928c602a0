"""A streamed GeoParquet nucleus table: ``NAME.nuclei.parquet`` (pyarrow, the ``parquet`` extra).

One row per nucleus with the CSV's columns plus ``geometry``, the outline as a WKB Polygon in
level-0 pixels. Rows are buffered and written one row group at a time (:data:`ROW_GROUP_ROWS`), so
memory is one row group whatever the slide holds. The GeoParquet ``geo`` key (spec 1.1.0: version,
primary column, and for ``geometry`` the WKB encoding, geometry types, ``crs: null`` since the
coordinates are image pixels, planar edges and the bounding box of all outlines) is added to the
file's key-value metadata when the file is closed, once the bounding box is known. The Arrow schema
is not stored in the file (``store_schema=False``; every column is a plain Parquet type), so
readers take the table's metadata from the file's key-value pairs, ``geo`` included.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from ..extras import import_extra, install_hint

__all__ = ["PARQUET_SUFFIX", "ROW_GROUP_ROWS", "PARQUET_EXTRA_HINT", "require_pyarrow", "ParquetTable",
           "polygon_wkb", "geo_metadata"]

PARQUET_SUFFIX = ".nuclei.parquet"
ROW_GROUP_ROWS = 65_536  # rows per row group: ~ 20 MB of numbers, outlines and classes buffered at most
GEOPARQUET_VERSION = "1.1.0"
GEOMETRY_COLUMN = "geometry"
PARQUET_EXTRA_HINT = install_hint("parquet")
_WKB_POLYGON_HEADER = struct.Struct("<BIII")  # little-endian byte order mark, type 3 (Polygon), 1 ring, points
WKB_LITTLE_ENDIAN, WKB_POLYGON = 1, 3


def require_pyarrow():
    """``pyarrow.parquet``, or :class:`~cdal_fast.extras.MissingExtraError` naming the extra that installs it."""
    return import_extra("pyarrow.parquet", "--nuclei-parquet")


def polygon_wkb(ring: tuple[tuple[float, float], ...]) -> bytes:
    """ISO WKB of a one-ring Polygon (little-endian doubles, the ring closed as given)."""
    coords = np.asarray(ring, dtype="<f8").reshape(-1, 2)
    return _WKB_POLYGON_HEADER.pack(WKB_LITTLE_ENDIAN, WKB_POLYGON, 1, coords.shape[0]) + coords.tobytes()


def geo_metadata(bbox: list[float] | None) -> dict:
    """The GeoParquet ``geo`` value for the outline column (``bbox`` [xmin, ymin, xmax, ymax] or None)."""
    column = {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": None, "edges": "planar"}
    if bbox is not None:
        column["bbox"] = bbox
    return {"version": GEOPARQUET_VERSION, "primary_column": GEOMETRY_COLUMN, "columns": {GEOMETRY_COLUMN: column}}


class ParquetTable:
    """Rows in, row groups out: ``add(values, ring)`` per nucleus, ``close()`` once (``abort()`` on error).

    ``columns`` are (name, kind) with kind ``int``, ``float`` (non-finite values are stored as null,
    as the CSV leaves them empty) or ``str``.
    """

    KINDS = ("int", "float", "str")

    def __init__(self, path: str | Path, columns: list[tuple[str, str]], row_group_rows: int = ROW_GROUP_ROWS) -> None:
        pq = require_pyarrow()
        import pyarrow as pa

        bad = [c for c in columns if c[1] not in self.KINDS]
        if bad:
            raise ValueError(f"ParquetTable: unknown column kinds {bad}; use one of {self.KINDS}")
        types = {"int": pa.int64(), "float": pa.float64(), "str": pa.string()}
        self._pa = pa
        self.columns = list(columns)
        self.schema = pa.schema([(n, types[k]) for n, k in columns] + [(GEOMETRY_COLUMN, pa.binary())])
        self._writer = pq.ParquetWriter(str(path), self.schema, compression="zstd", store_schema=False)
        self._rows = int(row_group_rows)
        # numbers go to preallocated numpy columns (8 bytes a value, not a Python object), text to lists
        self._kinds = [k for _, k in columns]
        self._numbers = {i: np.empty(self._rows, np.int64 if k == "int" else np.float64)
                         for i, k in enumerate(self._kinds) if k != "str"}
        self._texts: dict[int, list] = {i: [] for i, k in enumerate(self._kinds) if k == "str"}
        self._wkb: list[bytes] = []
        self._n = 0
        self._bbox = [math.inf, math.inf, -math.inf, -math.inf]
        self.rows_written = 0
        self.row_groups = 0

    def add(self, values: list, ring: tuple[tuple[float, float], ...]) -> None:
        i = self._n
        for k, v in enumerate(values):
            if k in self._texts:
                self._texts[k].append(v)
            else:
                self._numbers[k][i] = v
        self._wkb.append(polygon_wkb(ring))
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        b = self._bbox
        b[0], b[1], b[2], b[3] = min(b[0], min(xs)), min(b[1], min(ys)), max(b[2], max(xs)), max(b[3], max(ys))
        self._n += 1
        if self._n >= self._rows:
            self._flush()

    def _column(self, k: int, field):
        if k in self._texts:
            return self._pa.array(self._texts[k], type=field.type)
        values = self._numbers[k][:self._n]
        mask = ~np.isfinite(values) if self._kinds[k] == "float" else None
        return self._pa.array(values, type=field.type, mask=mask)

    def _flush(self) -> None:
        if self._n == 0:
            return
        arrays = [self._column(k, field) for k, field in enumerate(self.schema) if k < len(self._kinds)]
        arrays.append(self._pa.array(self._wkb, type=self._pa.binary()))
        self._writer.write_table(self._pa.Table.from_arrays(arrays, schema=self.schema))
        self.rows_written += self._n
        self.row_groups += 1
        self._n = 0
        self._wkb = []
        self._texts = {k: [] for k in self._texts}

    def close(self) -> None:
        self._flush()
        bbox = None if self.rows_written == 0 else [float(v) for v in self._bbox]
        self._writer.add_key_value_metadata({"geo": json.dumps(geo_metadata(bbox))})
        self._writer.close()

    def abort(self) -> None:
        """Close the file handle without the remaining rows (the caller deletes the partial file)."""
        self._writer.close()
