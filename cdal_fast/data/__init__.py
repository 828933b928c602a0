"""Datasets, image reading and augmentation for the three published tasks."""

from .datasets import (
    CxrData,
    HippocampusData,
    MonusegData,
    TaskData,
    load_task_data,
)
from .imageio import read_image, read_mask

__all__ = ["CxrData", "HippocampusData", "MonusegData", "TaskData", "load_task_data", "read_image", "read_mask"]
