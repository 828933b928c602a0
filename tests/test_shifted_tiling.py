"""Shifted tiling (issue 33, lever 1): vote v runs on its own offset grid of cells.

What must hold: each vote's grid partitions the slide (every pixel in exactly one cell, every cell
inside its tile, every tile inside the slide); the stitcher gives each pixel exactly V votes (mean
and spread of the votes, whatever the order of the tiles), maps each vote back from its frame;
results do not depend on batch size or loader workers; the job builds a one-vote sampler and
refuses shifted tiling with one vote.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cdal_fast.job import JobError, SegmentRequest, resolve_segment_job, vote_frames
from cdal_fast.network.config import get_preset
from cdal_fast.network.generator import Generator
from cdal_fast.sampling.decode import STD_TO_UNIT, MaskChannels
from cdal_fast.sampling.dihedral import apply_dihedral
from cdal_fast.weights import ModelBundle
from cdal_fast.wsi.pipeline import BandStitcher
from cdal_fast.wsi.resume import recorded_settings
from cdal_fast.wsi.tiling import TileGrid, VoteGrid, cell_layout, merge_vote_tiles, vote_grids, vote_offsets

from .distributed_fixtures import same_bytes
from .test_segment import mosaic, run, slide, tiny_weights  # noqa: F401  (fixtures)

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def shifted_grids(draw) -> list[VoteGrid]:
    tile = draw(st.sampled_from([4, 8, 16, 32]))
    context = draw(st.integers(0, tile - 1))
    votes = draw(st.integers(2, 6))
    h, w = draw(st.integers(1, 120)), draw(st.integers(1, 120))
    return vote_grids(h, w, tile, context, votes)


@SETTINGS
@given(shifted_grids())
def test_each_vote_grid_partitions_the_slide_into_cells_inside_their_tiles(grids):
    for g in grids:
        count = np.zeros((g.height, g.width), np.int64)
        for t in g.tiles():
            y0, y1, x0, x1 = t.cell
            assert t.vote == g.vote
            assert t.y <= y0 < y1 <= t.y + g.tile and t.x <= x0 < x1 <= t.x + g.tile
            assert t.y >= 0 and t.x >= 0
            assert t.y + g.tile <= g.height or t.y == 0  # inside the slide (a slide under a tile: from 0)
            assert t.x + g.tile <= g.width or t.x == 0
            count[y0:y1, x0:x1] += 1
        assert (count == 1).all()


def test_vote_grids_put_their_borders_in_different_places():
    for votes in range(2, 9):
        for stride in (64, 192, 256):
            offs = vote_offsets(votes, stride)
            assert offs[0] == (0, 0)
            assert len({dy for dy, _ in offs}) == votes and len({dx for _, dx in offs}) == votes
            assert all(0 <= d < stride for pair in offs for d in pair)
    # a sliver at an edge merges into its neighbour where both fit in one tile; a small slide is one cell
    assert cell_layout(300, 256, 256, 204) == [(0, 0, 204), (44, 204, 300)]
    assert cell_layout(100, 256, 256, 51) == [(0, 0, 100)]
    assert cell_layout(1000, 256, 224, 51)[1] == (35, 51, 275)  # 16 px of context each side


def _stitch(grids: list[VoteGrid], values, frames: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    h, w, tile = grids[0].height, grids[0].width, grids[0].tile
    prob, std = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
    stitcher = BandStitcher(TileGrid(h, w, tile, 0), 1, prob, std, kind=MaskChannels(1), vote_frames=frames)
    tiles = merge_vote_tiles(g.tiles() for g in grids)
    for t in tiles:
        stitcher.add(t, values(t), torch.zeros(1, tile, tile))
    stitcher.flush(h)
    return prob, std


@SETTINGS
@given(shifted_grids(), st.data())
def test_stitcher_gives_every_pixel_exactly_its_v_votes(grids, data):
    votes = len(grids)
    # probabilities on a 1/1000 grid (hypothesis' float strategy refuses to run where a test set
    # flush-to-zero earlier in the process)
    vals = [k / 1000 for k in data.draw(st.lists(st.integers(0, 1000), min_size=votes, max_size=votes))]
    tile = grids[0].tile
    prob, std = _stitch(grids, lambda t: torch.full((1, tile, tile), vals[t.vote]), (0,) * votes)
    v = np.asarray(vals, np.float64)  # a pixel that missed a vote, or got one twice, would show another mean
    assert np.abs(prob.astype(np.float64) - np.round(255 * v.mean())).max() <= 1
    assert np.abs(std.astype(np.float64) - np.round(255 * min(1.0, v.std() * STD_TO_UNIT))).max() <= 1


def test_each_vote_is_mapped_back_from_its_frame():
    h, w, tile = 70, 90, 32
    truth = torch.from_numpy(np.add.outer(np.arange(h) * 2.0, np.arange(w) * 1.0) / (2 * h + w)).float()
    frames = (5, 3, 6)
    grids = vote_grids(h, w, tile, 4, 3)

    def seen(t):  # what the sampler returns: the truth under the tile's frame (it never maps back itself)
        crop = torch.zeros(1, tile, tile)
        part = truth[t.y:t.y + tile, t.x:t.x + tile]
        crop[0, :part.shape[0], :part.shape[1]] = part
        return apply_dihedral(crop, frames[t.vote])

    prob, std = _stitch(grids, seen, frames)
    assert np.abs(prob.astype(np.float64) - np.round(255 * truth.numpy())).max() <= 1
    assert std.max() <= 1  # the three votes agree everywhere


def test_job_samples_one_vote_per_tile_and_refuses_one_vote_grids():
    cfg = get_preset("tiny", votes=3, tta=True)
    bundle = ModelBundle(Generator(cfg), cfg)
    job = resolve_segment_job(SegmentRequest(tiling="shifted", backend="eager"), bundle, gpu=False)
    assert job.opts.tiling == "shifted" and job.opts.vote_frames == vote_frames(3, True) == (0, 1, 2)
    assert job.opts.tile_overlap == 0 and job.opts.batch_size == 1  # one tile per CPU call bounds memory
    sampler = job.build_sampler(bundle.generator, torch.device("cpu"))
    assert (sampler.votes, job.sampler.votes) == (1, 3)
    assert job.model_record()["votes"] == 3
    blend = resolve_segment_job(SegmentRequest(tiling="blend"), bundle, gpu=False)
    assert blend.opts.tile_overlap == cfg.image_size // 4 and blend.opts.vote_frames == ()
    with pytest.raises(JobError, match="at least 2 votes") as err:
        resolve_segment_job(SegmentRequest(tiling="shifted", votes=1), bundle, gpu=False)
    assert err.value.param == "--tiling"
    # defaults: shifted on a CPU, blend on a GPU, for one-vote runs and for an overlap given alone
    def tiling(gpu: bool = False, **kw) -> str:
        return resolve_segment_job(SegmentRequest(**kw), bundle, gpu=gpu).opts.tiling

    assert (tiling(), tiling(gpu=True), tiling(votes=1), tiling(tile_overlap=16)) == (
        "shifted", "blend", "blend", "blend")
    assert resolve_segment_job(SegmentRequest(), bundle, gpu=True).opts.batch_size == 8  # GPU_BATCH, blended
    # radiographs and volumes are not tiled: all votes per image, and shifted tiling is refused for them
    assert tiling(task="cxr") == "blend"
    with pytest.raises(JobError, match="tiled slides") as err:
        resolve_segment_job(SegmentRequest(task="hippocampus", tiling="shifted"), bundle, gpu=False)
    assert err.value.param == "--tiling"
    # summaries written before shifted tiling existed read back as blended
    assert recorded_settings({"options": {"seed": 0}})["tiling"] == "blend"


@pytest.mark.slow
def test_shifted_segment_is_reproducible_across_batch_sizes_and_workers(tmp_path, slide, tiny_weights):  # noqa: F811
    probs, summaries = [], []
    for bs, workers in ((1, 0), (5, 2)):
        out = tmp_path / f"o{bs}"
        code, output = run([str(slide), "--out", str(out), "--weights", str(tiny_weights), "--batch-size", str(bs),
                            "--workers", str(workers), "--tiling", "shifted", "--tta", "--save-prob",
                            "--save-uncertainty", "--no-tissue-mask"])
        assert code == 0, output
        probs.append([tifffile.imread(out / f"mosaic.{k}.ome.tif", series=0, level=0) for k in ("prob", "uncertainty")])
        summaries.append(json.loads((out / "mosaic.json").read_text()))
    assert all(np.array_equal(a, b) for a, b in zip(*probs))  # noise keyed by position and vote: exactly equal
    s = summaries[0]
    assert (s["tiling"], s["votes"], s["tile_overlap"]) == ("shifted", 2, 0)
    # 500 working px, 64-px tiles: vote 0's grid has 8 x 8 cells, vote 1's (offset 32) 9 x 9
    assert s["tiles_sampled"] == s["tiles_total"] == 64 + 81
    assert probs[0][1].max() > 0  # two votes that differ somewhere: the spread is their own


def test_shifted_bands_over_two_cpu_workers_match_one_process(tmp_path, weights, slides, one_torch_thread):
    """The band runner (and Ray, which cuts the same units) samples vote tiles elsewhere and stitches them
    here: outputs byte-identical to the single process's."""
    from click.testing import CliRunner

    from cdal_fast.cli import main

    outs = []
    for device in ("cpu", "cpu,cpu"):
        out = tmp_path / device.replace(",", "_")
        res = CliRunner().invoke(main, ["segment", str(slides / "s1.ome.tif"), "--out", str(out), "--weights",
                                        str(weights), "--device", device, "--backend", "eager", "--batch-size", "3",
                                        "--tiling", "shifted", "--tile-overlap", "8", "--workers", "0",
                                        "--no-tissue-mask", "--save-prob", "--save-uncertainty", "-q"])
        assert res.exit_code == 0, res.output
        outs.append(out)
    same_bytes(outs[0], outs[1], ["s1"])
    summary = json.loads((outs[1] / "run_summary.json").read_text())
    assert summary["unit"] == "band" and len(summary["per_worker"]) == 2
