"""Shared fixtures: real data location, small models with non-trivial weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cdal_fast.network.config import get_preset
from cdal_fast.network.generator import Generator

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CDAL_SHARED_DATA", REPO.parent / "shared" / "data"))


def perturbed(gen: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter so that near-zero initialisations do not hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return gen


@pytest.fixture(scope="session", autouse=True)
def private_export_cache(tmp_path_factory):
    """`segment`'s default backend (auto) exports ONNX graphs into the cache: keep the suite's out of
    the user's ~/.cache (tests that need their own cache still set CDAL_FAST_CACHE themselves)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CDAL_FAST_CACHE", str(tmp_path_factory.mktemp("cdal_fast_cache")))
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small networks gain nothing from threads; on a busy 2-core runner they lose up to 20x to
    oversubscription. Use as ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_cfg():
    return get_preset("tiny")


@pytest.fixture
def tiny_gen(tiny_cfg):
    torch.manual_seed(0)
    return perturbed(Generator(tiny_cfg)).eval()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "monuseg").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def no_shipped_models(tmp_path, monkeypatch):
    """A build without shipped weights: the model folder is an empty directory."""
    import cdal_fast.models

    empty = tmp_path / "no_models"
    empty.mkdir()
    monkeypatch.setattr(cdal_fast.models, "MODEL_DIR", empty)
    return empty


from .distributed_fixtures import reference, slides, weights  # noqa: E402, F401  (session fixtures, shared)
