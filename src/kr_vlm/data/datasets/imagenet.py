"""ImageNet and its distribution-shift sets in CoOp's layout.

- ImageNet: `images/{train,val}/<wnid>/*`; label = index of the wnid in the sorted list of train
  folders; the val folder is the test set (CoOp has no separate ImageNet val set).
- ImageNet-V2: `<image_dir>/<0..999>/*`; label = the folder number, class name = that line of
  `classnames.txt` (file order, as CoOp's `ImageNetV2.read_data`).
- ImageNet-Sketch / -A / -R: `<image_dir>/<wnid>/*`; label = index in the sorted list of *their
  own* folders (200 for -A and -R, not ImageNet's 1000 indices), names from `classnames.txt`.
"""

from __future__ import annotations

from pathlib import Path

from kr_vlm.data.base import MalformedDatasetError
from kr_vlm.data.datasets.common import (
    Samples,
    read_wnid_classnames,
    readable_classname,
    require_dir,
    sorted_files,
    sorted_subdirs,
)


def _samples_from_folders(image_dir: Path, folders: list[str], label_of: dict[str, int]) -> Samples:
    return [(str(path), label_of[folder]) for folder in folders for path in sorted_files(image_dir / folder)]


def _names_for_wnids(wnids: list[str], classnames: dict[str, str], classnames_path: Path) -> list[str]:
    unknown = [wnid for wnid in wnids if wnid not in classnames]
    if unknown:
        raise MalformedDatasetError(
            f"{classnames_path} has no class name for the folders {unknown[:10]} ({len(unknown)} in all)."
        )
    return [readable_classname(classnames[wnid]) for wnid in wnids]


def read_imagenet(dataset_dir: Path, split: str) -> tuple[Samples, list[str]]:
    """Read ImageNet `train`, or its val folder for `val` and `test` (the same images, as in CoOp)."""
    classnames_path = dataset_dir / "classnames.txt"
    classnames = read_wnid_classnames(classnames_path)
    images = require_dir(dataset_dir / "images", "image folder")
    split_dir = require_dir(images / ("train" if split == "train" else "val"), f"ImageNet {split} folder")
    folders = sorted_subdirs(split_dir)
    if not folders:
        raise MalformedDatasetError(
            f"{split_dir} holds no class folders: CoOp's layout needs one folder per wnid "
            "(sort the official flat val images into <wnid>/ folders first)."
        )
    # Labels follow the sorted train folders; an evaluation-only copy without train/ uses its own.
    train_dir = images / "train"
    wnids = sorted_subdirs(train_dir) if train_dir.is_dir() else folders
    label_of = {wnid: label for label, wnid in enumerate(wnids)}
    stray = [folder for folder in folders if folder not in label_of]
    if stray:
        raise MalformedDatasetError(f"{split_dir} has class folders that {train_dir} lacks: {stray[:10]}.")
    names = _names_for_wnids(wnids, classnames, classnames_path)
    return _samples_from_folders(split_dir, folders, label_of), names


def read_imagenet_v2(dataset_dir: Path, split: str, *, image_dir: str) -> tuple[Samples, list[str]]:
    """Read ImageNet-V2 (numbered class folders; names in `classnames.txt` order)."""
    classnames_path = dataset_dir / "classnames.txt"
    names = [readable_classname(name) for name in read_wnid_classnames(classnames_path).values()]
    images = require_dir(dataset_dir / image_dir, "image folder")
    folders = sorted_subdirs(images)
    bad = [folder for folder in folders if not folder.isdigit() or int(folder) >= len(names)]
    if bad:
        raise MalformedDatasetError(
            f"{images}: class folders must be numbers 0..{len(names) - 1} (one per line of "
            f"{classnames_path}); found {bad[:10]}."
        )
    folders.sort(key=int)
    return _samples_from_folders(images, folders, {folder: int(folder) for folder in folders}), names


def read_wnid_folders(dataset_dir: Path, split: str, *, image_dir: str) -> tuple[Samples, list[str]]:
    """Read a test set of `<wnid>/` folders (ImageNet-Sketch, -A, -R): labels index its own folders."""
    classnames_path = dataset_dir / "classnames.txt"
    classnames = read_wnid_classnames(classnames_path)
    images = require_dir(dataset_dir / image_dir, "image folder")
    wnids = sorted_subdirs(images)
    if not wnids:
        raise MalformedDatasetError(f"{images} holds no class folders (expected one folder per wnid).")
    label_of = {wnid: label for label, wnid in enumerate(wnids)}
    names = _names_for_wnids(wnids, classnames, classnames_path)
    return _samples_from_folders(images, wnids, label_of), names
