"""AJI / PQ / F1 against hand-computed cases, and the MoNuSeg XML instance reader."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from cdal_fast.metrics import aggregated_jaccard, instance_scores
from cdal_fast.nuclei.groundtruth import annotated_names, annotation_mpp, annotation_path, read_instances


def row(*runs: tuple[int, int, int], n: int = 10) -> np.ndarray:
    """A 1 x n label map with label l on columns a..b for each (l, a, b)."""
    out = np.zeros((1, n), np.int32)
    for label, a, b in runs:
        out[0, a:b + 1] = label
    return out


def test_aji_adds_unmatched_objects_to_the_union():
    true = row((1, 0, 3), (2, 5, 6), (3, 9, 9))
    pred = row((1, 0, 1), (2, 2, 5), (3, 7, 8))
    # true 1 -> pred 1 (IoU 2/4 beats 2/6): I 2, U 4; true 2 -> pred 2 (IoU 1/5): I 1, U 5;
    # true 3 overlaps nothing: U += 1; pred 3 never chosen: U += 2.  AJI = 3 / 12.
    assert aggregated_jaccard(true, pred) == pytest.approx(3 / 12)
    s = instance_scores(true, pred)
    # no pair has IoU > 0.5 (true 1 / pred 1 is exactly 0.5): nothing matches
    assert (s.tp, s.fp, s.fn, s.pq, s.dq, s.sq) == (0, 3, 3, 0.0, 0.0, 0.0)


def test_pq_dq_sq_f1_hand_computed():
    true = row((4, 0, 3), (9, 6, 8))
    pred = row((1, 0, 2), (2, 6, 7), (3, 9, 9))
    s = instance_scores(true, pred)
    assert (s.tp, s.fp, s.fn) == (2, 1, 0)
    assert s.dq == pytest.approx(2 / 2.5) and s.f1 == pytest.approx(s.dq)
    assert s.sq == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert s.pq == pytest.approx(0.8 * (3 / 4 + 2 / 3) / 2)
    assert s.aji == pytest.approx((3 + 2) / (4 + 3 + 1))


def test_one_prediction_best_for_two_truths_counts_twice():
    true = row((1, 0, 2), (2, 3, 5))
    pred = row((7, 0, 5))
    # both truths pick pred 7: I 3 + 3, U 6 + 6
    assert aggregated_jaccard(true, pred) == pytest.approx(6 / 12)


def test_empty_cases():
    empty = np.zeros((4, 4), np.int32)
    one = empty.copy()
    one[1:3, 1:3] = 5
    assert instance_scores(empty, empty).pq == 1.0 and aggregated_jaccard(empty, empty) == 1.0
    assert aggregated_jaccard(one, empty) == 0.0 and aggregated_jaccard(empty, one) == 0.0
    s = instance_scores(one, empty)
    assert (s.fn, s.fp, s.pq) == (1, 0, 0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        instance_scores(one, empty[:3])


XML = """<Annotations MicronsPerPixel="0.5"><Annotation><Regions>
<Region Id="1"><Vertices><Vertex X="1" Y="1"/><Vertex X="6" Y="1"/><Vertex X="6" Y="6"/><Vertex X="1" Y="6"/>
</Vertices></Region>
<Region Id="2"><Vertices><Vertex X="4" Y="4"/><Vertex X="8" Y="4"/><Vertex X="8" Y="8"/><Vertex X="4" Y="8"/>
</Vertices></Region>
<Region Id="3"><Vertices><Vertex X="0" Y="0"/><Vertex X="2" Y="0"/></Vertices></Region>
</Regions></Annotation></Annotations>"""


def test_xml_instances_later_over_earlier(tmp_path):
    ann = tmp_path / "train" / "annotations"
    ann.mkdir(parents=True)
    with gzip.open(ann / "T1.xml.gz", "wt") as fh:
        fh.write(XML)
    path = annotation_path(tmp_path, "T1")
    assert path is not None and annotated_names(tmp_path) == {"T1"} and annotation_path(tmp_path, "T2") is None
    assert annotation_mpp(path) == 0.5
    labels = read_instances(path, (10, 10))
    assert labels[5, 5] == 2 and labels[2, 2] == 1  # the overlap belongs to the later region
    assert set(np.unique(labels)) == {0, 1, 2}  # the 2-vertex region is skipped
    (ann / "bad.xml").write_text("<Annotations><Region")
    with pytest.raises(ValueError, match="bad.xml: not a readable ImageScope XML"):
        read_instances(ann / "bad.xml", (4, 4))


def test_real_xml_matches_the_shared_mask(shared_data):
    from cdal_fast.sampling.imageio import read_mask

    name = "TCGA-21-5784-01Z-00-DX1"  # mask_sources.csv: xml_rasterised, 398 polygons
    root = shared_data / "monuseg"
    labels = read_instances(annotation_path(root, name), (1000, 1000))
    mask = read_mask(root / "train" / "masks" / f"{name}.png")
    assert np.array_equal(labels > 0, mask > 0)  # the shared mask is the union of the same polygons
    assert 390 <= len(np.unique(labels)) - 1 <= 398  # a few fully covered by later polygons
    assert annotation_mpp(annotation_path(root, name)) == pytest.approx(0.2527)


def test_eval_reports_instance_metrics_where_xml_exists(tmp_path, tiny_gen, shared_data, monkeypatch):
    import json

    import torch
    from click.testing import CliRunner

    import cdal_fast.evaluate
    from cdal_fast.cli import main
    from cdal_fast.weights import save_weights

    # The model's output is not the point here (and takes minutes on 2 cores): a map with nothing
    # above the threshold must score AJI 0 against the tile's XML nuclei, with every truth missed.
    monkeypatch.setattr(cdal_fast.evaluate, "predict_monuseg_tile", lambda *a, **k: torch.zeros(512, 512))
    save_weights(tmp_path / "w", tiny_gen)
    out = tmp_path / "r.json"
    names = "TCGA-21-5784-01Z-00-DX1,TCGA-18-5592-01Z-00-DX1"  # with and without XML nuclei
    res = CliRunner().invoke(main, ["eval", "--task", "monuseg", "--data", str(shared_data / "monuseg"), "--names",
                                    names, "--weights", str(tmp_path / "w.safetensors"), "--json", str(out),
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    with_xml, without = data["rows"]
    assert "aji" not in without and without["dice"] == 0.0
    assert (with_xml["aji"], with_xml["pq"], with_xml["n_pred"], with_xml["tp"]) == (0.0, 0.0, 0, 0)
    assert with_xml["fn"] == with_xml["n_true"] >= 390
    assert data["instance"]["n"] == 1 and data["instance"]["aji"] == 0.0
    assert "MEAN instance" in res.output and "aji 0.0000" in res.output
