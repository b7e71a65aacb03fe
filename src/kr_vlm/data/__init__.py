"""Datasets in CoOp's layout and aTLAS's / torchvision's formats, CLIP_benchmark's, few-shot sampling, prompt templates, DataModules, the digits set.

Nothing here knows about adapters or models.
"""

from kr_vlm.data.base import ClassificationTask, ImageListDataset
from kr_vlm.data.clip_benchmark import ClipBenchmarkDataModule
from kr_vlm.data.datamodules import FewShotDataModule
from kr_vlm.data.distribution_shift import DistributionShiftDataModule
from kr_vlm.data.registry import DATASET_NAMES, build_dataset
from kr_vlm.data.templates import get_templates

__all__ = [
    "DATASET_NAMES",
    "ClassificationTask",
    "ClipBenchmarkDataModule",
    "DistributionShiftDataModule",
    "FewShotDataModule",
    "ImageListDataset",
    "build_dataset",
    "get_templates",
]
