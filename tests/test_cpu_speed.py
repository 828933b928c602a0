"""CPU speed work (issue 22): the benchmark's baseline, ``--backend auto`` and CPU backend agreement.

* the original-protocol baseline of ``bench/cpu_tile.py`` against the authors' recorded sampling;
* the resolver's choices per device and dtype, and its fallbacks when a piece is missing (the
  availability checks are monkeypatched; the backend then built is real);
* every float32 CPU backend against eager float32 on a real MoNuSeg tile on the same noise: masks
  (Dice >= 0.99) and probabilities (max abs difference);
* the automatically chosen sampler is deterministic under a seed.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.authors_protocol import authors_tile
from cdal_fast.authors import config_from_args, convert_generator_state, read_args, read_authors_state
from cdal_fast.metrics import dice_iou
from cdal_fast.network import ops
from cdal_fast.network.generator import Generator
from cdal_fast.runtime import backend_choice, backends
from cdal_fast.runtime.backends import BackendError, build_sampler
from cdal_fast.runtime.onnx_tensorrt import OnnxSampler
from cdal_fast.sampling.imageio import read_image, resize_image
from cdal_fast.sampling.preprocess import normalise, to_chw_float
from cdal_fast.sampling.sampler import FixedStepSampler, decode_mask, sample

from .conftest import REPO

FIXTURES = Path(os.environ.get("CDAL_AUTHORS_FIXTURES", REPO.parent / "shared" / "fixtures" / "authors_cdal"))
NET_TOL = 1e-5  # the authors' fixtures' tolerance for vote means
MIN_DICE = 0.99  # issue 22: masks of every CPU path vs float32 eager on the same noise
PROB_TOL = 1e-4  # float32 backends differ only in summation order
STEPS, VOTES = 2, 3  # small enough for the suite, more than one step and vote so that both loops run
VAL_TILE = "TCGA-49-4488-01Z-00-DX1"  # the first validation tile of split.json

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HAS_ORT = backend_choice.missing_piece("onnx") is None


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Exports go to a temporary cache, never the user's ~/.cache."""
    monkeypatch.setenv("CDAL_FAST_CACHE", str(tmp_path / "cache"))


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"authors' fixtures not found at {FIXTURES}")
def test_authors_protocol_baseline_matches_original_sampling() -> None:
    cfg = config_from_args(read_args(FIXTURES / "monu_small.args.json"))
    gen = Generator(cfg)
    gen.load_state_dict(convert_generator_state(read_authors_state(FIXTURES / "monu_small.netG.pth"), cfg))
    io = load_file(str(FIXTURES / "monu_small.io.safetensors"))
    steps = cfg.num_steps
    z = torch.stack([io[f"sample.step{k}.z"] for k in range(steps)])
    post = torch.stack([io[f"sample.step{k}.post_noise"] for k in range(steps)])
    prob, std = authors_tile(gen.eval(), io["sample.cond"], io["sample.x_init"], z, post)
    assert float((prob - io["sample.vote_mean"]).abs().max()) <= NET_TOL
    assert torch.equal((prob >= 0.5).float(), io["sample.mask_round"])
    votes = torch.clamp((io["sample.x0_votes"] + 1) / 2, 0, 1)
    assert float((std - votes.std(0, unbiased=False, keepdim=True)).abs().max()) <= NET_TOL


def test_authors_protocol_refuses_a_batch(tiny_gen) -> None:
    with pytest.raises(ValueError, match="one image at a time; got a batch of 2"):
        authors_tile(tiny_gen, torch.zeros(2, 3, 64, 64), torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 100),
                     torch.zeros(1, 1, 1, 64, 64))


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime/onnx not installed")
def test_auto_on_cpu_float32_is_onnxruntime_and_builds_it(tiny_gen) -> None:
    choice = backend_choice.resolve_backend("cpu", torch.float32)
    assert (choice.backend, choice.passed_over) == ("onnx", ())
    assert isinstance(build_sampler(tiny_gen, STEPS, VOTES, "auto"), OnnxSampler)


def test_auto_runs_the_modules_for_reduced_precision_and_graphs_on_gpus() -> None:
    """CPU bf16: the PyTorch modules; CUDA: graph replay (measured fastest with masks identical to
    eager float32 on an H200), falling back to eager."""
    assert backend_choice.resolve_backend("cpu", torch.bfloat16).backend == "eager"
    gpu = backend_choice.resolve_backend("cuda", torch.float32)
    assert gpu.backend == "graphs" and "gpu_h200" in gpu.reason
    assert backend_choice.resolve_backend("cuda:1", torch.bfloat16).backend == "graphs"
    assert backend_choice.preference(torch.device("cuda"), torch.float32)[0][-1] == "eager"


def test_auto_falls_back_to_eager_without_onnxruntime(tiny_gen, monkeypatch) -> None:
    monkeypatch.setitem(backend_choice.PIECES, "onnx", lambda: "onnxruntime is not installed (pip install onnxruntime)")
    choice = backend_choice.resolve_backend("cpu", torch.float32)
    assert choice.backend == "eager"
    assert choice.passed_over == (("onnx", "onnxruntime is not installed (pip install onnxruntime)"),)
    assert "passed over: onnx: onnxruntime is not installed" in choice.describe()
    assert isinstance(build_sampler(tiny_gen, STEPS, VOTES, "auto"), FixedStepSampler)


def test_auto_falls_back_when_the_chosen_backend_fails_to_build(tiny_gen, monkeypatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise BackendError("export failed: disk full")

    monkeypatch.setitem(backend_choice.PIECES, "onnx", lambda: None)
    monkeypatch.setitem(backends.BUILDERS, "onnx", broken)
    with pytest.warns(UserWarning, match="onnx could not be built \\(export failed: disk full\\)"):
        sampler = build_sampler(tiny_gen, STEPS, VOTES, "auto")
    assert isinstance(sampler, FixedStepSampler)


def test_unknown_backend_names_auto_among_the_choices(tiny_gen) -> None:
    with pytest.raises(BackendError, match="choose one of auto, eager"):
        build_sampler(tiny_gen, STEPS, VOTES, "fastest")


@pytest.fixture(scope="module")
def real_tile() -> torch.Tensor:
    """A real MoNuSeg validation tile at the tiny preset's 64 px, normalised."""
    from .conftest import SHARED_DATA

    path = SHARED_DATA / "monuseg" / "train" / "images" / f"{VAL_TILE}.tif"
    if not path.is_file():
        pytest.skip(f"MoNuSeg tile not found at {path}")
    from cdal_fast.network.config import get_preset

    return normalise(resize_image(to_chw_float(read_image(path)), 64), get_preset("tiny"))


CPU_BACKENDS = ["torchscript", "fused", "onnx", "auto"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backend_agrees_with_eager_float32_on_a_real_tile(backend: str, tiny_gen, real_tile) -> None:
    if backend == "fused" and not ops.extension_available():
        pytest.skip("C++ op library not built")
    if backend in ("onnx", "auto") and not HAS_ORT:
        pytest.skip("onnxruntime/onnx not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ONNX exporter's tracer warnings
        sampler = build_sampler(tiny_gen, STEPS, VOTES, backend)
    eager = build_sampler(tiny_gen, STEPS, VOTES, "eager")
    with torch.inference_mode():
        ref, ref_std = sample(eager, real_tile, seed=5)
        got, got_std = sample(sampler, real_tile, seed=5)
    ref_mask, got_mask = decode_mask(ref), decode_mask(got)
    assert 0 < int(ref_mask.sum()) < ref_mask.numel()  # a mask with both classes: agreement means something
    assert dice_iou(got_mask > 0, ref_mask > 0)[0] >= MIN_DICE
    assert float((got - ref).abs().max()) <= PROB_TOL
    assert float((got_std - ref_std).abs().max()) <= PROB_TOL


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime/onnx not installed")
def test_auto_sampler_is_deterministic_under_a_seed(tiny_gen, real_tile) -> None:
    sampler = build_sampler(tiny_gen, STEPS, VOTES, "auto")
    first, _ = sample(sampler, real_tile, seed=11)
    again, _ = sample(sampler, real_tile, seed=11)
    other, _ = sample(sampler, real_tile, seed=12)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime/onnx not installed")
def test_float32_graph_uses_instance_norm_and_a_cached_graph_of_an_older_format_is_exported_again(tiny_gen) -> None:
    import onnx

    from cdal_fast.runtime.onnx_cache import cached_onnx
    from cdal_fast.runtime.onnx_export import GRAPH_FORMAT

    digest = "cd" * 32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = cached_onnx(tiny_gen, 1, 1, digest)
    model = onnx.load(str(path))
    ops_used = {n.op_type for n in model.graph.node}
    assert "InstanceNormalization" in ops_used and "GroupNormalization" not in ops_used
    assert {p.key: p.value for p in model.metadata_props}["cdal_graph_format"] == GRAPH_FORMAT
    for prop in model.metadata_props:  # what an older exporter wrote: no graph format
        if prop.key == "cdal_graph_format":
            prop.value = "1"
    onnx.save(model, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = cached_onnx(tiny_gen, 1, 1, digest)
    assert again == path
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props}["cdal_graph_format"] == GRAPH_FORMAT
