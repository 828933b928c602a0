"""The shipped one-pass model `monuseg-fast` (issue 34): packaged by the package's rules, tied to its
teacher, and reachable by name from segment, eval and export."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from cdal_fast.cli import main
from cdal_fast.models import MAX_FILE_BYTES, MAX_MODEL_BYTES, MODEL_DIR, default_weights, load_model
from cdal_fast.stain_reference import load_stain_reference
from cdal_fast.tasks import task_of_model

SAMPLE = MODEL_DIR.parent / "samples" / "sample_ihc.ome.tif"
FIRST_VAL = "TCGA-49-4488-01Z-00-DX1"


def test_student_is_packaged_with_its_card_and_tied_to_the_shipped_teacher():
    student = load_model(model="monuseg-fast")  # hashes checked on load
    teacher = load_model()
    assert task_of_model("monuseg-fast").name == "monuseg"
    assert student.config.one_pass and student.config.mpp == teacher.config.mpp
    assert student.provenance["teacher_sha256"] == teacher.sha256
    meta = json.loads(default_weights(model="monuseg-fast").with_suffix(".json").read_text())
    assert meta["dtype"] == "float16" and meta["provenance"]["task"] == "monuseg"
    sizes = [f.stat().st_size for f in student.files]
    assert max(sizes) <= MAX_FILE_BYTES and sum(sizes) <= MAX_MODEL_BYTES
    assert (MODEL_DIR / "MODEL_CARD_monuseg-fast.md").is_file()
    assert load_stain_reference(student.path).kind == "h-e"  # --stain-normalise works with it


def test_eval_by_name_reproduces_the_recorded_validation_row(shared_data, tmp_path):
    rows = {r["name"]: r for r in load_model(model="monuseg-fast").provenance["val_rows"]}
    res = CliRunner().invoke(main, ["eval", "--task", "monuseg", "--model", "monuseg-fast", "--data",
                                    str(shared_data / "monuseg"), "--names", FIRST_VAL, "--device", "cpu",
                                    "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "r.json").read_text())["rows"][0]
    assert got["dice"] == pytest.approx(rows[FIRST_VAL]["dice"], abs=0.005)
    res = CliRunner().invoke(main, ["eval", "--task", "cxr", "--model", "monuseg-fast", "--data", str(tmp_path)])
    assert res.exit_code != 0 and "not a cxr one" in res.output


def test_segment_by_name_writes_nuclei_with_the_predicted_uncertainty(tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["segment", str(SAMPLE), "--out", str(out), "--model", "monuseg-fast",
                                    "--backend", "eager", "--stain", "h-dab", "--workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "sample_ihc.json").read_text())
    assert summary["model"]["preset"] == "monuseg_fast"
    assert (summary["steps"], summary["votes"], summary["tiling"]) == (1, 1, "blend")
    assert summary["nuclei_count"] > 50
    with open(out / "sample_ihc.nuclei.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["nuclei_count"]
    spread = [float(r["mean_uncertainty"]) for r in rows]  # the student's uncertainty channel, not empty
    assert all(0 <= u <= 0.5 for u in spread) and max(spread) > 0


def test_export_by_name(tmp_path):
    res = CliRunner().invoke(main, ["export", "--format", "torchscript", "--model", "monuseg-fast", "--out",
                                    str(tmp_path / "fast.pt")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "fast.pt").stat().st_size > 1e6
    res = CliRunner().invoke(main, ["export", "--format", "onnx", "--model", "monuseg-fast", "--weights", "x",
                                    "--out", str(tmp_path / "x.onnx")])
    assert res.exit_code != 0 and "give one" in res.output
