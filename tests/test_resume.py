"""Which finished outputs a rerun may skip: cdal_fast.wsi.resume on summaries as each task writes them."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from cdal_fast.job import ModelRef, SamplerSettings, SegmentJob
from cdal_fast.wsi.options import SegmentOptions
from cdal_fast.wsi.outputs import complete_summary, is_complete, required_outputs
from cdal_fast.wsi.resume import MODEL_KEYS, changed_settings, recorded_settings, run_settings

INFO = {"sha256": "ab" * 32, "steps": 4, "votes": 5, "tta": True, "threshold": 0.4, "backend": "eager"}
OPTS = SegmentOptions(roi="rois/", tissue_threshold=20.0)


def job(info: dict, opts: SegmentOptions) -> SegmentJob:
    """A job whose model and sampler settings are ``info`` (a summary's ``model`` keys), with ``opts``."""
    model = ModelRef(None, None, info.get("weights", "/m/w.safetensors"), info["sha256"], info["sha256"],
                     bool(info["sha256"]), "monuseg_s", 4)
    sampler = SamplerSettings(info.get("backend", "eager"), "float32", info.get("device", "cpu"), info["steps"],
                              info["votes"], info["tta"])
    return SegmentJob("monuseg", model, sampler, info["threshold"], opts)


def differs(summary: dict, info: dict, opts: SegmentOptions, **kw) -> list[str]:
    return changed_settings(summary, job(info, opts), **kw)


def settings(info: dict, opts: SegmentOptions, **kw) -> dict:
    return run_settings(job(info, opts), **kw)


def _summary(tmp_path: Path, data: dict) -> dict:
    """``data`` written as NAME.json and read back as the completion check reads it."""
    path = tmp_path / "NAME.json"
    path.write_text(json.dumps(data))
    return complete_summary(path)


def _slide_summary(info: dict, opts: SegmentOptions) -> dict:
    """A slide summary's fields as pipeline.summarise writes them."""
    return {"complete": True, "steps": info["steps"], "votes": info["votes"], "seed": opts.seed,
            "tile_overlap": opts.tile_overlap, "options": asdict(opts), "model": info}


def test_same_settings_resume_and_what_cannot_change_the_outputs_is_ignored(tmp_path):
    summary = _summary(tmp_path, _slide_summary(INFO, OPTS))
    assert differs(summary, INFO, OPTS) == []
    same_outputs = replace(OPTS, batch_size=32, workers=0, save_prob=True, max_pixels=1e6)
    assert differs(summary, INFO | {"backend": "onnx", "device": "cuda"}, same_outputs) == []


def test_each_output_shaping_setting_is_named(tmp_path):
    summary = _summary(tmp_path, _slide_summary(INFO, OPTS))
    assert differs(summary, INFO | {"threshold": 0.5}, OPTS) == ["threshold 0.4 -> 0.5"]
    assert differs(summary, INFO | {"sha256": "cd" * 32}, OPTS) == [f"sha256 {'ab' * 32!r} -> {'cd' * 32!r}"]
    assert differs(summary, INFO | {"votes": 30, "tta": False}, OPTS) == ["votes 5 -> 30", "tta True -> False"]
    changed = differs(summary, INFO, replace(OPTS, seed=1, tissue=False, roi=None, nuclei_threshold=0.6))
    assert changed == ["seed 0 -> 1", "roi 'rois/' -> None", "tissue True -> False", "nuclei_threshold 0.5 -> 0.6"]


def test_tissue_options_do_not_matter_for_tiles_without_tissue_detection(tmp_path):
    summary = _summary(tmp_path, _slide_summary(INFO, OPTS))
    no_tissue = replace(OPTS, tissue=False, tissue_threshold=None)
    assert differs(summary, INFO, no_tissue, whole_slide=False) == []
    assert len(differs(summary, INFO, no_tissue, whole_slide=True)) == 2


def test_unverified_weights_are_told_apart_by_their_path(tmp_path):
    """Weights whose JSON records no hash have an empty sha256: the path is then what differs."""
    info = INFO | {"sha256": "", "weights": "/models/a.safetensors"}
    summary = _summary(tmp_path, _slide_summary(info, OPTS))
    assert differs(summary, info, OPTS) == []
    other = info | {"weights": "/models/b.safetensors"}
    assert differs(summary, other, OPTS) == ["weights '/models/a.safetensors' -> '/models/b.safetensors'"]
    # verified weights are compared by hash alone: the same file moved elsewhere still resumes
    moved = INFO | {"weights": "/elsewhere/a.safetensors"}
    assert differs(_summary(tmp_path, _slide_summary(INFO | {"weights": "/m/a"}, OPTS)), moved, OPTS) == []


def test_asked_for_maps_are_part_of_completeness(tmp_path):
    """A rerun asking for --save-prob over outputs made without it is not complete, so it writes the map."""
    for name in ("s.mask.ome.tif", "s.nuclei.geojson", "s.nuclei.csv"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "s.json").write_text(json.dumps({"complete": True}))
    assert is_complete(tmp_path, "s", False, "ome", required_outputs(OPTS))
    assert not is_complete(tmp_path, "s", False, "ome", required_outputs(replace(OPTS, save_prob=True)))
    assert not is_complete(tmp_path, "s", False, "ome", required_outputs(replace(OPTS, save_uncertainty=True)))
    (tmp_path / "s.prob.ome.tif").write_bytes(b"x")
    assert is_complete(tmp_path, "s", False, "ome", required_outputs(replace(OPTS, save_prob=True)))


def test_nucleus_parameters_matter_only_when_this_run_makes_nuclei(tmp_path):
    summary = _summary(tmp_path, _slide_summary(INFO, OPTS))
    assert differs(summary, INFO, replace(OPTS, nuclei=False, nuclei_threshold=0.6)) == []


def test_radiograph_and_volume_summaries_compare_what_they_record(tmp_path):
    """They keep no options: seed, steps and votes at the top level, and the model info."""
    info = INFO | {"threshold": None, "tta": False}
    summary = _summary(tmp_path, {"complete": True, "steps": 4, "votes": 5, "seed": 0, "model": info})
    recorded = recorded_settings(summary)
    assert recorded == {k: info[k] for k in MODEL_KEYS} | {"seed": 0}
    assert differs(summary, info, replace(OPTS, tile_overlap=16)) == []  # not recorded: not compared
    assert differs(summary, info, replace(OPTS, seed=3)) == ["seed 0 -> 3"]


def test_older_summaries_without_a_setting_still_resume(tmp_path):
    """A summary from before a setting was recorded (here: no votes, TTA or threshold in the model info)."""
    old = {"complete": True, "steps": 4, "votes": 5, "seed": 0, "model": {"sha256": INFO["sha256"], "steps": 4}}
    assert differs(_summary(tmp_path, old), INFO, OPTS) == []
    assert differs({"complete": True}, INFO, OPTS) == []
    assert complete_summary(tmp_path / "missing.json") is None  # not complete: never compared


def test_an_roi_file_edited_in_place_is_a_changed_setting(tmp_path):
    """The ROI is compared by contents too: the slide's own file in an ROI folder."""
    rois = tmp_path / "rois"
    rois.mkdir()
    (rois / "s1.geojson").write_text('{"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]}')
    (rois / "s2.geojson").write_text('{"type": "Polygon", "coordinates": [[[0, 0], [5, 0], [5, 5], [0, 0]]]}')
    opts = replace(OPTS, roi=str(rois))
    recorded = settings(INFO, opts, slide=tmp_path / "s1.ome.tif")["roi_sha256"]
    assert recorded and recorded != settings(INFO, opts, slide=tmp_path / "s2.svs")["roi_sha256"]
    summary = _summary(tmp_path, _slide_summary(INFO, opts) | {"roi": {"sha256": recorded, "kind": "geojson"}})
    assert differs(summary, INFO, opts, slide=tmp_path / "s1.ome.tif") == []
    (rois / "s1.geojson").write_text('{"type": "Polygon", "coordinates": [[[0, 0], [8, 0], [8, 8], [0, 0]]]}')
    [changed] = differs(summary, INFO, opts, slide=tmp_path / "s1.ome.tif")
    assert changed.startswith(f"roi_sha256 {recorded!r} -> '")
    (rois / "s1.geojson").unlink()  # gone: differs too (the run itself then names the missing file)
    assert differs(summary, INFO, opts, slide=tmp_path / "s1.ome.tif") == [f"roi_sha256 {recorded!r} -> None"]
    # summaries written before the hash was recorded compare the path alone
    older = _summary(tmp_path, _slide_summary(INFO, opts))
    assert differs(older, INFO, opts, slide=tmp_path / "s1.ome.tif") == []


def test_stain_options_are_compared_where_they_shape_the_outputs(tmp_path):
    """Issue 36: the stain, its vectors and ring, the IHC thresholds and stain normalisation change what a
    slide's files hold; each is compared only where it acts."""
    from cdal_fast.nuclei.stain import StainProfile

    he = replace(OPTS, stain="h-e")
    summary = _summary(tmp_path, _slide_summary(INFO, he))
    assert differs(summary, INFO, replace(he, stain="h-dab")) == ["stain 'h-e' -> 'h-dab'"]
    assert differs(summary, INFO, replace(he, cell_ring_um=4.0)) == ["cell_ring_um 2.0 -> 4.0"]
    assert differs(summary, INFO, replace(he, stain_vectors="estimate")) == ["stain_vectors 'default' -> 'estimate'"]
    # positivity does not act on H&E: other thresholds resume
    assert differs(summary, INFO, replace(he, positivity_thresholds=(0.1, 0.3, 0.5))) == []
    dab = replace(OPTS, stain="h-dab")
    summary = _summary(tmp_path, _slide_summary(INFO, dab))
    assert differs(summary, INFO, replace(dab, positivity_thresholds=(0.1, 0.3, 0.5))) == [
        "positivity_thresholds [0.2, 0.4, 0.6] -> [0.1, 0.3, 0.5]"]
    assert differs(summary, INFO, replace(dab, positivity_compartment="cell")) == [
        "positivity_compartment 'nucleus' -> 'cell'"]
    # the Parquet table and the report only add files: not compared (a missing table makes the input incomplete)
    assert differs(summary, INFO, replace(dab, nuclei_parquet=True, report=False)) == []
    assert "nuclei_parquet" in required_outputs(replace(dab, nuclei_parquet=True))
    # stain normalisation changes what the model sees: compared, with the reference it mapped onto
    ref = StainProfile("h-e", ("Hematoxylin", "Eosin"), ((0.6, 0.7, 0.3), (0.2, 0.8, 0.5)), (1.2, 0.8))
    normalised = replace(dab, stain_normalise=True, stain_reference=ref)
    changed = differs(summary, INFO, normalised)
    assert changed[0] == "stain_normalise False -> True" and changed[1].startswith("stain_reference None -> ")
    summary = _summary(tmp_path, _slide_summary(INFO, normalised))
    other = replace(ref, max_concentrations=(1.0, 0.8))
    changed = differs(summary, INFO, replace(normalised, stain_reference=other))
    assert len(changed) == 1 and changed[0].startswith("stain_reference ")
    # summaries written before these options existed still resume
    old = _slide_summary(INFO, dab)
    old["options"] = {k: v for k, v in old["options"].items() if k not in ("stain", "positivity_thresholds")}
    assert differs(_summary(tmp_path, old), INFO, replace(dab, positivity_thresholds=(0.1, 0.3, 0.5))) == []
