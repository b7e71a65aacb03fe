"""Write tiny datasets in CoOp's folder layout for tests (importable: `from coop_layout import ...`).

Every image is a small solid-colour JPEG whose colour depends only on its class, so a model can
learn the tiny sets quickly. `make_coop_dataset` returns what a reader should find.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from kr_vlm.data.registry import DATASETS

SPLITS = ("train", "val", "test")
RAW_NAMES = ["red_fox", "blue_whale", "green_apple", "yellow_cab", "white_tiger", "black_swan"]


@dataclass
class FakeDataset:
    """What `make_coop_dataset` wrote: the dataset folder, the expected readable class names
    (index = label) and the number of images per split (`imagenet` counts `val` and `test` alike)."""

    path: Path
    classnames: list[str]
    counts: dict[str, int]


def write_image(path: Path, label: int, index: int = 0, size: int = 8) -> None:
    """Write a solid-colour `size`x`size` image; the colour encodes `label` (format from suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = ((label * 97 + index) % 256, (label * 57 + 80) % 256, (label * 31 + 160) % 256)
    Image.new("RGB", (size, size), colour).save(path)


def _raw_name(label: int) -> str:
    return RAW_NAMES[label] if label < len(RAW_NAMES) else f"thing_{label}"


PerClass = int | list[int]


def _per_split(per_class: PerClass | dict[str, PerClass], classes: int) -> dict[str, list[int]]:
    """Images of every class in every split: `counts[split][label]`."""
    by_split = per_class if isinstance(per_class, dict) else dict.fromkeys(SPLITS, per_class)
    counts = {}
    for split, count in by_split.items():
        counts[split] = list(count) if isinstance(count, list) else [count] * classes
        if len(counts[split]) != classes:
            raise ValueError(f"{split}: {len(counts[split])} counts for {classes} classes")
    return counts


def _listed(entries: list, shuffle: random.Random | None) -> list:
    """The entries of one split file as written: class by class, or shuffled (as real split files)."""
    if shuffle is not None:
        shuffle.shuffle(entries)
    return entries


def _wnid(index: int) -> str:
    return f"n{1440764 + 7 * index:08d}"


def _write_split_zhou(
    dataset_dir: Path, name: str, classes: int, counts: dict[str, list[int]], shuffle: random.Random | None
) -> list[str]:
    info = DATASETS[name]
    image_root = info.reader.keywords["image_dir"]
    table: dict[str, list] = {}
    for split in SPLITS:
        entries = []
        for label in range(classes):
            raw = _raw_name(label)
            for i in range(counts[split][label]):
                if name == "stanford_cars":  # CoOp's paths start with cars_train/ or cars_test/
                    rel = f"cars_{'test' if split == 'test' else 'train'}/{label:03d}{split}{i:03d}.jpg"
                elif name in ("oxford_pets", "oxford_flowers"):  # flat image folders
                    rel = f"{raw}_{split}_{i}.jpg"
                else:
                    rel = f"{raw}/{split}_{i:03d}.jpg"
                write_image(dataset_dir / image_root / rel, label, i)
                entries.append([rel, label, raw])
        table[split] = _listed(entries, shuffle)
    (dataset_dir / info.reader.keywords["split_file"]).write_text(json.dumps(table))
    if name == "oxford_flowers":
        cat_to_name = {str(label + 1): _raw_name(label) for label in range(classes)}
        (dataset_dir / "cat_to_name.json").write_text(json.dumps(cat_to_name))
    return [_raw_name(label).replace("_", " ") for label in range(classes)]


def _write_fgvc(
    dataset_dir: Path, classes: int, counts: dict[str, list[int]], shuffle: random.Random | None
) -> list[str]:
    variants = [f"Jet-{label}00 {_raw_name(label)}" for label in range(classes)]
    (dataset_dir / "variants.txt").write_text("".join(f"{v}\n" for v in variants))
    image_id = 1000000
    for split in SPLITS:
        lines = []
        for label, variant in enumerate(variants):
            for i in range(counts[split][label]):
                image_id += 1
                write_image(dataset_dir / "images" / f"{image_id}.jpg", label, i)
                lines.append(f"{image_id} {variant}\n")
        (dataset_dir / f"images_variant_{split}.txt").write_text("".join(_listed(lines, shuffle)))
    return [v.replace("_", " ") for v in variants]


def _write_classnames_txt(dataset_dir: Path, wnids: list[str]) -> None:
    lines = [f"{wnid} {_raw_name(index).replace('_', ' ')}\n" for index, wnid in enumerate(wnids)]
    (dataset_dir / "classnames.txt").write_text("".join(lines))


def _write_imagenet(dataset_dir: Path, classes: int, counts: dict[str, list[int]]) -> FakeDataset:
    wnids = [_wnid(label) for label in range(classes)]
    _write_classnames_txt(dataset_dir, wnids)
    for label, wnid in enumerate(wnids):
        for i in range(counts["train"][label]):
            write_image(dataset_dir / "images" / "train" / wnid / f"{wnid}_{i}.JPEG", label, i)
        for i in range(counts["test"][label]):
            write_image(
                dataset_dir / "images" / "val" / wnid / f"ILSVRC2012_val_{label:04d}{i:04d}.JPEG", label, i
            )
    classnames = [_raw_name(label).replace("_", " ") for label in range(classes)]
    totals = {"train": sum(counts["train"]), "val": sum(counts["test"]), "test": sum(counts["test"])}
    return FakeDataset(dataset_dir, classnames, totals)


def _write_shift_set(dataset_dir: Path, name: str, classes: int, counts: dict[str, list[int]]) -> FakeDataset:
    image_dir = dataset_dir / DATASETS[name].reader.keywords["image_dir"]
    image_dir.mkdir(parents=True, exist_ok=True)
    if name in ("imagenet_a", "imagenet_r"):
        # 200 of ImageNet's 1000 classes in reality: here every second wnid of classnames.txt.
        all_wnids = [_wnid(index) for index in range(2 * classes)]
        chosen = list(range(1, 2 * classes, 2))
        (image_dir / "README.txt").write_text("not a class folder\n")
    else:
        all_wnids = [_wnid(index) for index in range(classes)]
        chosen = list(range(classes))
    _write_classnames_txt(dataset_dir, all_wnids)
    for label, index in enumerate(chosen):
        folder = str(index) if name == "imagenet_v2" else all_wnids[index]
        for i in range(counts["test"][label]):
            write_image(image_dir / folder / f"{i:04d}.jpeg", label, i)
    names = [_raw_name(index).replace("_", " ") for index in chosen]
    return FakeDataset(dataset_dir, names, {"test": sum(counts["test"])})


def make_coop_dataset(
    root: str | Path,
    name: str,
    classes: int = 3,
    per_class: PerClass | dict[str, PerClass] = 2,
    shuffle_seed: int | None = None,
) -> FakeDataset:
    """Write dataset `name` (a kr_vlm name, not `digits`) in CoOp's layout under `root`.

    Args:
        root: the data root (`$DATA`); the dataset goes to `root/<CoOp folder>`.
        name: one of `kr_vlm.data.registry.DATASET_NAMES` except `digits`.
        classes: number of classes.
        per_class: images per class in every split, or a dict `{"train": n, "val": n, "test": n}`;
            each count may be a list with one count per class. ImageNet writes `train` and `test`
            (its val folder); the shift sets write `test`.
        shuffle_seed: if given, the split files list their entries shuffled with this seed (as
            CoOp's real ones are, so classes first appear out of label order); else class by class.

    ImageNet-A and -R get class folders for every *second* wnid of their `classnames.txt`, so their
    labels (index among their own folders) differ from ImageNet's indices, as in the real sets.
    """
    info = DATASETS[name]
    if info.folder is None:
        raise ValueError(f"{name!r} is not a CoOp dataset on disk.")
    counts = _per_split(per_class, classes)
    shuffle = None if shuffle_seed is None else random.Random(shuffle_seed)
    dataset_dir = Path(root) / info.folder
    dataset_dir.mkdir(parents=True, exist_ok=True)
    if name == "imagenet":
        return _write_imagenet(dataset_dir, classes, counts)
    if info.splits == ("test",):
        return _write_shift_set(dataset_dir, name, classes, counts)
    if name == "fgvc_aircraft":
        classnames = _write_fgvc(dataset_dir, classes, counts, shuffle)
    else:
        classnames = _write_split_zhou(dataset_dir, name, classes, counts, shuffle)
    return FakeDataset(dataset_dir, classnames, {split: sum(counts[split]) for split in SPLITS})


@contextmanager
def read_only(folder: Path, monkeypatch) -> Iterator[Path]:
    """Make `folder` read-only while the block runs, as a shared data root is.

    Tests may run as root, who may write anywhere: `os.access` (which kr_vlm asks before it writes)
    then says what it says to any other user.
    """
    folder = Path(folder).absolute()
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).absolute().is_relative_to(folder):
            return False
        return real_access(path, mode, *args, **kwargs)

    folder.chmod(0o555)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(os, "access", access)
            yield folder
    finally:
        folder.chmod(0o755)
