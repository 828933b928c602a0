"""Issue 36 item 4: the GeoParquet nucleus table, read back with pyarrow and checked against the CSV."""

from __future__ import annotations

import csv
import json
import math
import sys

import numpy as np
import pytest
import shapely
import torch
from shapely.geometry import shape

from cdal_fast.job import JobError, SegmentRequest, resolve_segment_job
from cdal_fast.network.config import get_preset
from cdal_fast.network.generator import Generator
from cdal_fast.nuclei.parquet import ParquetTable, polygon_wkb, require_pyarrow
from cdal_fast.weights import ModelBundle
from cdal_fast.wsi.options import SegmentOptions
from cdal_fast.wsi.outputs import is_complete, required_outputs
from cdal_fast.wsi.pipeline import segment_slide

from .slides import write_ome_pyramid
from .test_segment_nuclei import DarkIsNucleus
from .test_stain import MPP0, constructed_slide


@pytest.fixture
def pq():
    return pytest.importorskip("pyarrow.parquet", reason="pyarrow (the parquet extra) is not installed")


def test_parquet_table_equals_the_csv_and_geojson(tmp_path, pq):
    slide = write_ome_pyramid(tmp_path / "cells.ome.tif", constructed_slide(), mpp=MPP0, levels=1)
    opts = SegmentOptions(batch_size=4, workers=0, tile_overlap=16, tissue=False, stain="h-dab", nuclei_parquet=True)
    out = tmp_path / "out"
    summary = segment_slide(slide, out, DarkIsNucleus(), get_preset("tiny"), opts, torch.device("cpu"))
    table = pq.read_table(out / "cells.nuclei.parquet")
    with open(out / "cells.nuclei.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert table.num_rows == len(rows) == summary["nuclei_count"] == 8
    assert table.column_names == list(rows[0]) + ["geometry"]
    cols = table.to_pydict()
    for i, r in enumerate(rows):
        for name, text in r.items():
            got = cols[name][i]
            if name in ("id", "class"):
                assert str(got) == text
            elif text == "":
                assert got is None
            else:  # the CSV keeps 6 significant digits: the table's full value, so printed, is the CSV's text
                assert f"{got:.6g}" == text, name
    features = json.loads((out / "cells.nuclei.geojson").read_text())["features"]
    geo = json.loads(table.schema.metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    column = geo["columns"]["geometry"]
    assert column["encoding"] == "WKB" and column["geometry_types"] == ["Polygon"] and column["crs"] is None
    polygons = shapely.from_wkb(cols["geometry"])
    x0, y0, x1, y1 = column["bbox"]
    for poly, f, i in zip(polygons, features, cols["id"]):
        assert f["properties"]["nucleus_id"] == i
        assert poly.is_valid and poly.equals_exact(shape(f["geometry"]), tolerance=0.006)  # GeoJSON: 2 decimals
        bx0, by0, bx1, by1 = poly.bounds
        assert x0 <= bx0 and y0 <= by0 and bx1 <= x1 and by1 <= y1
    assert min(p.bounds[0] for p in polygons) == x0 and max(p.bounds[3] for p in polygons) == y1
    assert is_complete(out, "cells", False, "ome", required_outputs(opts))
    (out / "cells.nuclei.parquet").unlink()  # the table is an output like the CSV: missing -> not done
    assert not is_complete(out, "cells", False, "ome", required_outputs(opts))


def test_rows_are_written_in_row_groups(tmp_path, pq):
    path = tmp_path / "t.parquet"
    t = ParquetTable(path, [("id", "int"), ("v", "float"), ("c", "str")], row_group_rows=10)
    ring = ((0.0, 0.0), (4.0, 0.0), (4.0, 3.0), (0.0, 0.0))
    for i in range(35):
        t.add([i + 1, math.nan if i == 3 else i / 7, "1+"], tuple((x + i, y) for x, y in ring))
    t.close()
    f = pq.ParquetFile(path)
    assert f.metadata.num_row_groups == 4 and f.metadata.num_rows == 35
    assert [f.metadata.row_group(k).num_rows for k in range(4)] == [10, 10, 10, 5]
    d = f.read().to_pydict()
    assert d["v"][3] is None and d["v"][4] == pytest.approx(4 / 7) and d["id"][-1] == 35
    assert shapely.from_wkb(d["geometry"][2]).equals(shapely.Polygon([(x + 2, y) for x, y in ring]))
    assert json.loads(f.schema_arrow.metadata[b"geo"])["columns"]["geometry"]["bbox"] == [0.0, 0.0, 38.0, 3.0]
    empty = tmp_path / "e.parquet"
    ParquetTable(empty, [("id", "int")]).close()
    geo = json.loads(pq.read_schema(empty).metadata[b"geo"])
    assert pq.ParquetFile(empty).metadata.num_rows == 0 and "bbox" not in geo["columns"]["geometry"]


def test_wkb_is_iso_little_endian():
    ring = ((1.5, 2.0), (3.0, 2.0), (3.0, 5.25), (1.5, 2.0))
    wkb = polygon_wkb(ring)
    assert wkb[:1] == b"\x01" and int.from_bytes(wkb[1:5], "little") == 3
    assert shapely.from_wkb(wkb).equals(shapely.Polygon(ring))
    assert np.frombuffer(wkb[13:], "<f8").reshape(-1, 2).tolist() == [list(p) for p in ring]


def test_a_missing_pyarrow_is_named_with_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"cdal-fast\[parquet\]"):
        require_pyarrow()
    cfg = get_preset("tiny")
    bundle = ModelBundle(Generator(cfg), cfg)
    with pytest.raises(JobError, match=r"cdal-fast\[parquet\]") as err:
        resolve_segment_job(SegmentRequest(options={"nuclei_parquet": True}), bundle, gpu=False)
    assert err.value.param == "--nuclei-parquet"
    resolve_segment_job(SegmentRequest(options={}), bundle, gpu=False)  # without the table: no pyarrow needed
