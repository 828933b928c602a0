"""The task registry: one :class:`Task` record per published cDAL task, looked up everywhere.

A task is what the paper evaluates (MoNuSeg nuclei, chest X-ray lungs, hippocampus MRI). Its record
says everything the rest of the package used to restate in its own table or ``if task ==`` chain:
the shipped models, what ``segment`` reads, the preprocessing and architecture facts of the authors'
code (for importing their checkpoints), the labelled-data layout, the scoring protocol, and the
functions that segment one input, tell whether an input is done, load training data and score.

Functions are named as ``"module:attribute"`` and imported on first use (like entry points), so this
module imports only the network constants and every layer may look a task up without an import
cycle. A record may also hold the callables themselves (tests replace one that way).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .network.config import MONUSEG_MEAN, MONUSEG_STD

__all__ = ["Task", "TASKS", "TASK_NAMES", "get_task", "task_of_model"]

FunctionRef = str | Callable[..., Any]


@dataclass(frozen=True)
class Task:
    """One published task (see the module docstring)."""

    name: str
    title: str
    models: tuple[str, ...]  # shipped models of this task (``cdal_fast/models/NAME.*``); the first is the default
    inputs: str  # what ``segment`` reads: "slides" (tiled, nuclei as objects), "radiographs", "volumes"
    # the authors' code for this task (spec sections 7-8), used to import their checkpoints
    authors_dataset: str  # prefix of their ``dataset`` argument
    img_channels: int
    norm_mean: tuple[float, ...]
    norm_std: tuple[float, ...]
    mask_polarity: int  # 1: object = +1; -1: object = the -1 side (their chest X-ray masks)
    test_votes: int  # V of their test protocol
    mpp: float | None  # um/px the model works at (None: resolution-free inputs)
    disc: str  # discriminator layout: "large" or "small"
    volume_scaling: str
    volume_orientation: str
    # labelled data and scoring
    layout: str  # the folder layout of labelled data (:mod:`cdal_fast.datasets`)
    protocol: str  # the section-8 scoring protocol, in words
    nuclei_annotations: bool  # labelled tiles may carry XML nucleus outlines (instance scores: AJI, PQ)
    # functions, "module:attribute" (or callables)
    segment: FunctionRef  # (path, out_dir, TaskRun, progress) -> summary
    done: FunctionRef  # (out_dir, path, SegmentOptions) -> summary of complete outputs, or None
    training_data: FunctionRef  # (data, cfg, split, split_file) -> TaskData
    evaluate: FunctionRef  # (data, cfg, runner, split, names, limit, progress, split_file) -> EvalResult

    @property
    def tiled(self) -> bool:
        """Inputs are slides cut into tiles: one slide's tiles can be spread over several workers."""
        return self.inputs == "slides"

    @property
    def default_model(self) -> str:
        return self.models[0]

    def function(self, field: str) -> Callable[..., Any]:
        """The callable of ``field`` (``segment``, ``done``, ``training_data``, ``evaluate``)."""
        ref = getattr(self, field)
        if callable(ref):
            return ref
        module, _, attr = ref.partition(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj

    def with_functions(self, **functions: FunctionRef) -> Task:
        return replace(self, **functions)


_SLIDE_JOB = "cdal_fast.wsi.batch"
TASKS: dict[str, Task] = {
    "monuseg": Task(
        name="monuseg", title="H&E nuclei (MoNuSeg)", models=("monuseg", "monuseg-fast"), inputs="slides",
        authors_dataset="monu", img_channels=3, norm_mean=MONUSEG_MEAN, norm_std=MONUSEG_STD, mask_polarity=1,
        test_votes=5, mpp=0.5,  # their 1000 -> 512 resize of 40x tiles: the model works at about 20x
        disc="large", volume_scaling="zscore", volume_orientation="native",
        layout="images/NAME.tif + masks/NAME.png (or train/ inside); split.json",
        protocol="tile -> 512x512 -> four 256 patches; Dice/IoU of the nucleus class at 512x512",
        nuclei_annotations=True,
        segment=f"{_SLIDE_JOB}:segment_slide_input", done=f"{_SLIDE_JOB}:slide_done",
        training_data="cdal_fast.training.data:MonusegData.from_split", evaluate="cdal_fast.evaluate:evaluate_monuseg",
    ),
    "cxr": Task(
        name="cxr", title="chest X-ray lungs", models=("cxr",), inputs="radiographs",
        # mean of the grey channels / 255, then 2x - 1: (x - 127.5) / 127.5; their masks put the lung at -1
        authors_dataset="lung", img_channels=1, norm_mean=(127.5,), norm_std=(127.5,), mask_polarity=-1,
        test_votes=30, mpp=None, disc="large", volume_scaling="zscore", volume_orientation="native",
        layout="images/NAME.png + masks/NAME.png (grey); a split file (train/splits/cxr.json)",
        protocol="whole image at 256x256; Dice/IoU of the lung class", nuclei_annotations=False,
        segment=f"{_SLIDE_JOB}:segment_radiograph_input", done=f"{_SLIDE_JOB}:radiograph_input_done",
        training_data="cdal_fast.training.data:CxrData.from_split", evaluate="cdal_fast.evaluate:evaluate_cxr",
    ),
    "hippocampus": Task(
        name="hippocampus", title="hippocampus MRI (MSD Task04)", models=("hippocampus",), inputs="volumes",
        # per-volume min-max to [-1, 1], then identity
        authors_dataset="hippo", img_channels=1, norm_mean=(0.0,), norm_std=(1.0,), mask_polarity=1,
        test_votes=5, mpp=None, disc="small", volume_scaling="minmax", volume_orientation="LPI",
        layout="imagesTr/NAME.nii.gz + labelsTr/NAME.nii.gz; a split file (train/splits/hippocampus.json)",
        protocol="3D sliding window of 32^3 patches (overlap 0.75) as axial slices; per-class Dice/IoU",
        nuclei_annotations=False,
        segment=f"{_SLIDE_JOB}:segment_volume_input", done=f"{_SLIDE_JOB}:volume_input_done",
        training_data="cdal_fast.training.data:HippocampusData.from_split",
        evaluate="cdal_fast.evaluate:evaluate_hippocampus",
    ),
}
TASK_NAMES = tuple(TASKS)


def get_task(name: str) -> Task:
    """The task called ``name``, or a ValueError naming the choices."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None


def task_of_model(model: str) -> Task:
    """The task a shipped model belongs to (``--model`` names shipped models)."""
    for task in TASKS.values():
        if model in task.models:
            return task
    names = [m for t in TASKS.values() for m in t.models]
    raise ValueError(f"unknown model {model!r}; choose one of {', '.join(names)}")
