"""Every dataset kr_vlm knows, where it lives under the data root, and `build_dataset`.

The layout is CoOp's (github KaiyangZhou/CoOp, DATASETS.md), so an existing CoOp `$DATA` folder
works as the root. `data/README.md` in the repository describes each folder and where to get it.

What `split` means: `train`, `val` and `test` come from the dataset's own split files. ImageNet
has no separate val set: its `val` is the official val folder, i.e. the same images as `test`
(`DatasetInfo.val_is_test`). The DataModules therefore draw ImageNet's few-shot validation shots
from its train folders, disjoint from the training shots (CLIP-LoRA's rule); only `sampler=coop`
validates on the test set, as CoOp does (`kr_vlm.data.fewshot`). The distribution-shift sets (ImageNet-V2,
-Sketch, -A, -R) have only `test`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from kr_vlm.data.base import DatasetNotFoundError, ImageListDataset
from kr_vlm.data.datasets import (
    read_fgvc_aircraft,
    read_imagenet,
    read_imagenet_v2,
    read_split_zhou,
    read_wnid_folders,
)
from kr_vlm.errors import ConfigError

SPLITS = ("train", "val", "test")
README_HINT = "See data/README.md for the layout of every dataset and where to download it."

Reader = Callable[[Path, str], tuple[list[tuple[str, int]], list[str]]]


@dataclass(frozen=True)
class DatasetInfo:
    """Where one dataset lives and how to read it.

    Attributes:
        name: kr_vlm's name (`build_dataset(name, ...)`).
        folder: the folder under the data root (CoOp's `dataset_dir`); None for the embedded digits.
        coop_name: CoOp's class name: the key of its prompt template and the `<Name>` in
            `split_zhou_<Name>.json`; None where CoOp has no such dataset.
        layout: the expected files inside `folder`, shown when something is missing.
        reader: `reader(dataset_dir, split) -> (samples, classnames)`; None for digits.
        splits: the splits the dataset has.
        val_is_test: its `val` split holds the test images (ImageNet), so it must not be used to
            select a model; few-shot validation shots come from `train` instead.
    """

    name: str
    folder: str | None
    coop_name: str | None
    layout: str
    reader: Reader | None
    splits: tuple[str, ...] = SPLITS
    val_is_test: bool = False


def _split_zhou(
    name: str, folder: str, coop_name: str, image_dir: str, extra_layout: str = ""
) -> DatasetInfo:
    split_file = f"split_zhou_{coop_name}.json"
    images = f"{image_dir}/" if image_dir else "<image folders named in the split file>"
    return DatasetInfo(
        name=name,
        folder=folder,
        coop_name=coop_name,
        layout=f"{folder}/{{{images}, {split_file}{extra_layout}}}",
        reader=partial(read_split_zhou, image_dir=image_dir, split_file=split_file),
    )


def _shift_set(
    name: str, folder: str, coop_name: str, image_dir: str, reader: Callable[..., Any]
) -> DatasetInfo:
    return DatasetInfo(
        name=name,
        folder=folder,
        coop_name=coop_name,
        layout=f"{folder}/{{{image_dir}/<class folders>/, classnames.txt}}",
        reader=partial(reader, image_dir=image_dir),
        splits=("test",),
    )


_INFOS = (
    DatasetInfo(
        "imagenet",
        "imagenet",
        "ImageNet",
        "imagenet/{images/train/<wnid>/, images/val/<wnid>/, classnames.txt}",
        read_imagenet,
        val_is_test=True,
    ),
    _split_zhou("caltech101", "caltech-101", "Caltech101", "101_ObjectCategories"),
    _split_zhou("oxford_pets", "oxford_pets", "OxfordPets", "images"),
    # StanfordCars' split paths start with cars_train/ or cars_test/: the image root is the folder.
    _split_zhou("stanford_cars", "stanford_cars", "StanfordCars", "", ", cars_train/, cars_test/"),
    _split_zhou("oxford_flowers", "oxford_flowers", "OxfordFlowers", "jpg", ", cat_to_name.json"),
    _split_zhou("food101", "food-101", "Food101", "images"),
    DatasetInfo(
        "fgvc_aircraft",
        "fgvc_aircraft",
        "FGVCAircraft",
        "fgvc_aircraft/{images/, variants.txt, images_variant_train.txt, images_variant_val.txt, "
        "images_variant_test.txt}",
        read_fgvc_aircraft,
    ),
    _split_zhou("sun397", "sun397", "SUN397", "SUN397"),
    _split_zhou("dtd", "dtd", "DescribableTextures", "images"),
    _split_zhou("eurosat", "eurosat", "EuroSAT", "2750"),
    _split_zhou("ucf101", "ucf101", "UCF101", "UCF-101-midframes"),
    _shift_set(
        "imagenet_v2", "imagenetv2", "ImageNetV2", "imagenetv2-matched-frequency-format-val", read_imagenet_v2
    ),
    _shift_set("imagenet_sketch", "imagenet-sketch", "ImageNetSketch", "images", read_wnid_folders),
    _shift_set("imagenet_a", "imagenet-adversarial", "ImageNetA", "imagenet-a", read_wnid_folders),
    _shift_set("imagenet_r", "imagenet-rendition", "ImageNetR", "imagenet-r", read_wnid_folders),
    DatasetInfo("digits", None, None, "embedded in kr_vlm (kr_vlm.data.digits)", None),
    DatasetInfo("glyphs", None, None, "drawn by kr_vlm (kr_vlm.data.glyphs)", None),
)

DATASETS: dict[str, DatasetInfo] = {info.name: info for info in _INFOS}
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)
# The ImageNet shift sets.
IMAGENET_SHIFT_DATASETS: tuple[str, ...] = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def dataset_info(name: str) -> DatasetInfo:
    """The `DatasetInfo` of `name`; an unknown name is an error listing the known ones."""
    if name not in DATASETS:
        raise ConfigError(
            f"Unknown dataset {name!r} (data.dataset). Known datasets: {', '.join(DATASET_NAMES)}."
        )
    return DATASETS[name]


def dataset_folder(name: str, root: str | Path) -> Path | None:
    """The absolute folder of dataset `name` under the data root `root` (None for the embedded digits)."""
    info = dataset_info(name)
    return None if info.folder is None else Path(root).expanduser().absolute() / info.folder


def build_dataset(name: str, root: str | Path, split: str, **kwargs: Any) -> ImageListDataset:
    """Read split `split` (`train`, `val` or `test`) of dataset `name` under the data root `root`.

    Keyword options for the CoOp datasets: `transform` (applied to each PIL image) and
    `skip_corrupt` (skip unreadable images instead of failing). `digits` passes every option on to
    `kr_vlm.data.digits.build_digits`, `glyphs` to `kr_vlm.data.glyphs.build_glyphs`.

    Raises:
        ConfigError: an unknown dataset name (the message lists the known ones), or a split the
            dataset does not have.
        DatasetNotFoundError: the root, the dataset folder or one of its files is missing (the
            message names the expected path and the layout).
        MalformedDatasetError: the files are there but inconsistent.
    """
    info = dataset_info(name)
    if split not in info.splits:
        only = " (it is an evaluation-only distribution-shift set)" if info.splits == ("test",) else ""
        raise ConfigError(
            f"Dataset {name!r} has no split {split!r}; its splits are {list(info.splits)}{only}."
        )
    if info.reader is None:
        # Imported here so the registry works before, and without, the modules that draw these sets.
        if name == "glyphs":
            from kr_vlm.data.glyphs import build_glyphs

            return build_glyphs(root, split, **kwargs)
        from kr_vlm.data.digits import build_digits

        return build_digits(root, split, **kwargs)

    unknown = sorted(set(kwargs) - {"transform", "skip_corrupt"})
    if unknown:
        raise TypeError(
            f"build_dataset({name!r}) got unknown options {unknown}; it takes transform, skip_corrupt."
        )
    # Absolute paths keep samples valid if the working directory changes (Hydra's job.chdir).
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"Data root {root} does not exist. Point paths.data_dir at your CoOp-style $DATA folder. {README_HINT}"
        )
    dataset_dir = root / info.folder
    try:
        if not dataset_dir.is_dir():
            raise DatasetNotFoundError(f"Missing dataset folder {dataset_dir}")
        samples, classnames = info.reader(dataset_dir, split)
    except DatasetNotFoundError as err:
        raise DatasetNotFoundError(
            f"{name}: {err}. Expected layout under {root}: {info.layout}. {README_HINT}"
        ) from None
    return ImageListDataset(samples, classnames, name=f"{name}/{split}", **kwargs)
