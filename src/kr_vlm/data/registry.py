"""Every dataset kr_vlm knows, where it lives under the data root, and `build_dataset`.

Two families share the data root. CoOp's 11 datasets and ImageNet's shifts in CoOp's layout (github
KaiyangZhou/CoOp, DATASETS.md), so an existing CoOp `$DATA` folder works as the root; and the 22 datasets
of aTLAS (github fredzzhang/atlas, DATASETS.md; the KRAdapter authors' protocol), in torchvision's formats
or aTLAS's folders (`kr_vlm.data.atlas`), so an aTLAS `~/data` folder works as the root too. Where both
have a dataset (DTD, EuroSAT, ...), aTLAS's version is `<name>_atlas`: its own splits, class names and
templates. `data/README.md` in the repository describes each folder and where to get it.

What `split` means: `train`, `val` and `test` come from the dataset's own split files. ImageNet
has no separate val set: its `val` is the official val folder, i.e. the same images as `test`
(`DatasetInfo.val_is_test`). The DataModules therefore draw ImageNet's few-shot validation shots
from its train folders, disjoint from the training shots (CLIP-LoRA's rule); only `sampler=coop`
validates on the test set, as CoOp does (`kr_vlm.data.fewshot`). The distribution-shift sets (ImageNet-V2,
-Sketch, -A, -R) have only `test`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from kr_vlm.data import atlas
from kr_vlm.data.base import DatasetNotFoundError, ImageListDataset
from kr_vlm.data.datasets import (
    atlas_folders,
    read_fgvc_aircraft,
    read_imagenet,
    read_imagenet_v2,
    read_split_zhou,
    read_wnid_folders,
    torchvision_sets,
)
from kr_vlm.errors import ConfigError

SPLITS = ("train", "val", "test")
README_HINT = "See data/README.md for the layout of every dataset and where to download it."
ATLAS_GUIDE = "https://github.com/fredzzhang/atlas/blob/main/DATASETS.md"
CLASSNAME_SOURCES = ("default", "clip_benchmark")

# reader(dataset_dir, split) -> (samples, classnames) or, where samples are not image files,
# (samples, classnames, open_image) (see `ImageListDataset`).
Reader = Callable[[Path, str], tuple[Any, ...]]


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
        val_in_train: its `val` split is a part of its `train` split (aTLAS's held-out images,
            `kr_vlm.data.atlas.atlas_val_indices`): few-shot validation shots come from the training
            images the training shots leave, never from `val`.
        atlas_name: aTLAS's name of the dataset (its templates and published accuracies), if aTLAS has it.
        clip_benchmark_name: CLIP_benchmark's name of the dataset (its class names and templates), where
            its labels are in the same order as ours.
        fetch: how to get the dataset, for the message when it is missing (`{root}`: the data root).
        download: fetches it into the data root (`data.download=true`); None where it must be set up by hand.
    """

    name: str
    folder: str | None
    coop_name: str | None
    layout: str
    reader: Reader | None
    splits: tuple[str, ...] = SPLITS
    val_is_test: bool = False
    val_in_train: bool = False
    atlas_name: str | None = None
    clip_benchmark_name: str | None = None
    fetch: str = ""
    download: Callable[[Path], None] | None = None


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


def _atlas_set(
    name: str,
    folder: str,
    layout: str,
    reader: Reader,
    clip_benchmark_name: str | None = None,
    own_val: bool = False,
    guide: str = "",
) -> DatasetInfo:
    """One of aTLAS's datasets: torchvision fetches it with `data.download=true` where it can, else it is set
    up by hand as aTLAS's DATASETS.md says (`guide`: the section); `own_val`: aTLAS validates on its own
    val split, not on held-out training images."""
    can_download = name in torchvision_sets.DOWNLOADS
    return DatasetInfo(
        name=name,
        folder=folder,
        coop_name=None,
        layout=layout,
        reader=reader,
        val_in_train=not own_val,
        atlas_name=atlas.ATLAS_NAMES[name],
        clip_benchmark_name=clip_benchmark_name,
        fetch=torchvision_sets.download_hint(name)
        if can_download
        else f"set it up as aTLAS's DATASETS.md says ({ATLAS_GUIDE}, {guide})",
        download=partial(torchvision_sets.download, name) if can_download else None,
    )


_TV = torchvision_sets
_AF = atlas_folders
_ATLAS_INFOS = (
    _atlas_set(
        "stanford_cars_atlas", "stanford_cars",
        "stanford_cars/{cars_train/, cars_test/, devkit/{cars_meta.mat, cars_train_annos.mat}, "
        "cars_test_annos_withlabels.mat}", _TV.read_stanford_cars, "cars",
        # torchvision's links are dead: aTLAS's guide says where the files are now.
        guide="'Setup Guide for Stanford Cars'",
    ),
    _atlas_set(
        "dtd_atlas", "dtd", "dtd/{train/<texture>/, val/<texture>/} (val: DTD's test1, aTLAS's test set)",
        _AF.read_dtd, "dtd", guide="'Setup Guide for DTD'",
    ),
    _atlas_set(
        "eurosat_atlas", "EuroSAT_splits", "EuroSAT_splits/{train,val,test}/<class>/", _AF.read_eurosat,
        "eurosat", own_val=True, guide="'Setup Guide for EuroSAT'",
    ),
    _atlas_set(
        "gtsrb", "gtsrb", "gtsrb/{GTSRB/Training/<class>/*.ppm, GTSRB/Final_Test/Images/, GT-final_test.csv}",
        _TV.read_gtsrb, "gtsrb",
    ),
    _atlas_set(
        "mnist", "MNIST/raw",
        "MNIST/raw/{train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte} (torchvision's MNIST files, unzipped)", _TV.read_mnist, "mnist",
    ),
    _atlas_set(
        "resisc45", "resisc45",
        "resisc45/{NWPU-RESISC45/<class>/*.jpg, resisc45-train.txt, resisc45-val.txt, resisc45-test.txt}",
        _AF.read_resisc45, "resisc45", guide="'Setup Guide for RESISC45'",
    ),
    _atlas_set(
        "sun397_atlas", "sun397", "sun397/{train/<a_abbey>/, val/<a_abbey>/} (val: SUN397's Testing_01)",
        _AF.read_sun397, "sun397", guide="'Setup Guide for SUN397'",
    ),
    _atlas_set("svhn", "svhn", "svhn/{train_32x32.mat, test_32x32.mat}", _TV.read_svhn, "svhn"),
    _atlas_set(
        "cifar10", "cifar-10-batches-py", "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}",
        partial(_TV.read_cifar, class_name="CIFAR10"), "cifar10",
    ),
    _atlas_set(
        "cifar100", "cifar-100-python", "cifar-100-python/{train, test, meta}",
        partial(_TV.read_cifar, class_name="CIFAR100"), "cifar100",
    ),
    _atlas_set(
        "imagenet_atlas", "imagenet", "imagenet/{train/<wnid>/, val_in_folder/<wnid>/ or val/<wnid>/}",
        _AF.read_imagenet, "imagenet1k", guide="'Setup Guide for ImageNet'",
    ),
    _atlas_set(
        "stl10", "stl10", "stl10/stl10_binary/{train_X.bin, train_y.bin, test_X.bin, test_y.bin, class_names.txt}",
        _TV.read_stl10, "stl10",
    ),
    _atlas_set(
        "food101_atlas", "food-101", "food-101/{images/<dish>/*.jpg, meta/train.json, meta/test.json}",
        _TV.read_food101, "food101",
    ),
    _atlas_set(
        "caltech101_atlas", "caltech101", "caltech101/101_ObjectCategories/<category>/image_<nnnn>.jpg",
        partial(_TV.read_caltech, class_name="Caltech101"), "caltech101",
    ),
    _atlas_set(
        "caltech256", "caltech256", "caltech256/256_ObjectCategories/<nnn.category>/<nnn>_<nnnn>.jpg",
        partial(_TV.read_caltech, class_name="Caltech256"), "caltech256",
    ),
    _atlas_set(
        "fgvc_aircraft_atlas", "fgvc-aircraft-2013b",
        "fgvc-aircraft-2013b/data/{images/, variants.txt, images_variant_{train,val,test}.txt}",
        _TV.read_fgvc_aircraft, "fgvc_aircraft", own_val=True,
    ),
    _atlas_set(
        "oxford_flowers_atlas", "flowers-102", "flowers-102/{jpg/, imagelabels.mat, setid.mat}",
        _TV.read_flowers102, "flowers", own_val=True,
    ),
    _atlas_set(
        "oxford_pets_atlas", "oxford-iiit-pet", "oxford-iiit-pet/{images/, annotations/{trainval,test}.txt}",
        _TV.read_oxford_pets, "pets",
    ),
    DatasetInfo(
        "cub200", "CUB_200_2011", None,
        "CUB_200_2011/{images/, images.txt, classes.txt, image_class_labels.txt, train_test_split.txt}",
        _AF.read_cub200, val_in_train=True, atlas_name="CUB200",
        fetch="unpack CUB_200_2011.tgz (https://data.caltech.edu/records/65de6-vp158) in the data root, as "
        "aTLAS's reader downloads it",
    ),
    DatasetInfo(
        "pascal_voc", "VOCdevkit", None,
        "VOCdevkit/VOC2007/{JPEGImages/, Annotations/, ImageSets/Main/aeroplane_{train,val,test}.txt}",
        _AF.read_pascal_voc, atlas_name="PascalVOC", clip_benchmark_name="voc2007",
        fetch="unpack VOC2007's trainval and test archives (http://host.robots.ox.ac.uk/pascal/VOC/voc2007/) in "
        "the data root, as aTLAS's reader downloads them",
    ),
    _atlas_set(
        "country211", "country211", "country211/{train,valid,test}/<ISO code>/", _TV.read_country211,
        "country211", own_val=True,
    ),
    _atlas_set(
        "ucf101_atlas", "UCF-101-midframes", "UCF-101-midframes/{<Action>/*.jpg, split_zhou_UCF101.json}",
        _AF.read_ucf101, own_val=True, guide="'Setup Guide for UCF101'",
    ),
)  # fmt: skip

_INFOS = (
    DatasetInfo(
        "imagenet",
        "imagenet",
        "ImageNet",
        "imagenet/{images/train/<wnid>/, images/val/<wnid>/, classnames.txt}",
        read_imagenet,
        val_is_test=True,
        clip_benchmark_name="imagenet1k",
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
    # CLIP_benchmark's MNIST names the same ten digits in the same order.
    DatasetInfo(
        "digits", None, None, "embedded in kr_vlm (kr_vlm.data.digits)", None, clip_benchmark_name="mnist"
    ),
    DatasetInfo("glyphs", None, None, "drawn by kr_vlm (kr_vlm.data.glyphs)", None),
    *_ATLAS_INFOS,
)

# CoOp's datasets that aTLAS has too (in its own splits): their templates are aTLAS's under this name. RandLoRA's
# get_templates gives every ImageNet variant ImageNet's templates.
_COOP_ATLAS_NAMES = {
    "imagenet_v2": "ImageNet", "imagenet_sketch": "ImageNet", "imagenet_a": "ImageNet", "imagenet_r": "ImageNet",
    "imagenet": "ImageNet", "caltech101": "Caltech101", "oxford_pets": "OxfordIIITPet", "stanford_cars": "Cars",
    "oxford_flowers": "Flowers102", "food101": "Food101", "fgvc_aircraft": "FGVCAircraft", "sun397": "SUN397",
    "dtd": "DTD", "eurosat": "EuroSAT", "ucf101": "UCF101",
}  # fmt: skip
DATASETS: dict[str, DatasetInfo] = {
    info.name: replace(info, atlas_name=_COOP_ATLAS_NAMES[info.name])
    if info.name in _COOP_ATLAS_NAMES
    else info
    for info in _INFOS
}
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)
# The ImageNet shift sets.
IMAGENET_SHIFT_DATASETS: tuple[str, ...] = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")


BENCHMARK_PREFIX = "clip_benchmark/"


@lru_cache(maxsize=64)
def _benchmark_info(name: str) -> DatasetInfo:
    """A dataset of CLIP_benchmark (`clip_benchmark/<its name>`): read by `kr_vlm.data.clip_benchmark`."""
    benchmark_name = name.removeprefix(BENCHMARK_PREFIX)
    return DatasetInfo(
        name=name,
        folder=None,
        coop_name=None,
        layout=f"CLIP_benchmark's {benchmark_name!r}",
        reader=None,
        splits=("train", "test"),
        val_in_train=True,
        clip_benchmark_name=benchmark_name,
    )


def dataset_info(name: str) -> DatasetInfo:
    """The `DatasetInfo` of `name`; an unknown name is an error listing the known ones.

    Besides `DATASET_NAMES`, `clip_benchmark/<name>` is any dataset of CLIP_benchmark (`data=clip_benchmark`).
    """
    if name.startswith(BENCHMARK_PREFIX) and len(name) > len(BENCHMARK_PREFIX):
        return _benchmark_info(name)
    if name not in DATASETS:
        close = difflib.get_close_matches(str(name), DATASET_NAMES, n=3, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ConfigError(
            f"Unknown dataset {name!r} (data.dataset).{hint} Known datasets: {', '.join(DATASET_NAMES)}."
        )
    return DATASETS[name]


def dataset_folder(name: str, root: str | Path) -> Path | None:
    """The absolute folder of dataset `name` under the data root `root` (None for the embedded digits)."""
    info = dataset_info(name)
    return None if info.folder is None else Path(root).expanduser().absolute() / info.folder


def build_dataset(
    name: str, root: str | Path, split: str, *, classnames: str = "default", **kwargs: Any
) -> ImageListDataset:
    """Read split `split` (`train`, `val` or `test`) of dataset `name` under the data root `root`.

    `classnames`: `default` (the dataset's own: CoOp's files for CoOp's datasets, aTLAS's for aTLAS's) or
    `clip_benchmark` (the names CLIP_benchmark evaluates with; needs `pip install 'kr_vlm[benchmark]'`).
    Keyword options for the datasets on disk: `transform` (applied to each PIL image) and `skip_corrupt`
    (skip unreadable images instead of failing). `digits` passes every option on to
    `kr_vlm.data.digits.build_digits`, `glyphs` to `kr_vlm.data.glyphs.build_glyphs`.

    Raises:
        ConfigError: an unknown dataset name (the message lists the known ones), a split the dataset
            does not have, or class names it has none of.
        DatasetNotFoundError: the root, the dataset folder or one of its files is missing (the
            message names the expected path, the layout and how to get the data).
        MalformedDatasetError: the files are there but inconsistent.
    """
    info = dataset_info(name)
    if split not in info.splits:
        only = " (it is an evaluation-only distribution-shift set)" if info.splits == ("test",) else ""
        raise ConfigError(
            f"Dataset {name!r} has no split {split!r}; its splits are {list(info.splits)}{only}."
        )
    if classnames not in CLASSNAME_SOURCES:
        raise ConfigError(
            f"data.classnames must be one of {', '.join(CLASSNAME_SOURCES)}, got {classnames!r}."
        )
    if info.clip_benchmark_name is not None and name.startswith(BENCHMARK_PREFIX):
        from kr_vlm.data.clip_benchmark import BenchmarkSource, build_benchmark_dataset, resolve_root

        dataset_root, download = kwargs.pop("dataset_root", None), kwargs.pop("download", False)
        source = BenchmarkSource(
            info.clip_benchmark_name, resolve_root(dataset_root, info.clip_benchmark_name, root), download
        )
        return build_benchmark_dataset(source, split, classnames, **kwargs)
    if info.reader is None:
        if classnames != "default":
            raise ConfigError(f"{name!r} has only its own class names: leave data.classnames at default.")
        # Imported here so the registry works before, and without, the modules that draw these sets.
        if name == "glyphs":
            from kr_vlm.data.glyphs import build_glyphs

            return build_glyphs(root, split, **kwargs)
        from kr_vlm.data.digits import build_digits

        return build_digits(root, split, **kwargs)

    unknown = sorted(set(kwargs) - {"transform", "skip_corrupt"})
    if unknown:
        raise TypeError(
            f"build_dataset({name!r}) got unknown options {unknown}; it takes transform, skip_corrupt, classnames."
        )
    # Absolute paths keep samples valid if the working directory changes (Hydra's job.chdir).
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"Data root {root} does not exist. Point paths.data_dir at your data folder (a CoOp $DATA or an "
            f"aTLAS ~/data folder). {README_HINT}"
        )
    dataset_dir = root / info.folder
    # aTLAS's validation images of a dataset without its own are held out of its training split.
    read_split = "train" if split == "val" and info.val_in_train else split
    try:
        if not dataset_dir.is_dir():
            raise DatasetNotFoundError(f"Missing dataset folder {dataset_dir}")
        samples, names, *image_source = info.reader(dataset_dir, read_split)
    except DatasetNotFoundError as err:
        fetch = f" To get it, {info.fetch.format(root=root)}." if info.fetch else ""
        raise DatasetNotFoundError(
            f"{name}: {err}. Expected layout under {root}: {info.layout}.{fetch} {README_HINT}"
        ) from None
    if read_split != split:
        samples = [samples[index] for index in atlas.atlas_val_indices(len(samples))]
    if classnames == "clip_benchmark":
        from kr_vlm.data.clip_benchmark import benchmark_classnames

        names = benchmark_classnames(info, names)
    open_image = image_source[0] if image_source else None
    return ImageListDataset(samples, names, name=f"{name}/{split}", open_image=open_image, **kwargs)


def download_dataset(name: str, root: str | Path) -> None:
    """Fetch dataset `name` into the data root `root` if it is not there and can be downloaded
    (`data.download=true`); a dataset that must be set up by hand is left to `build_dataset`'s message."""
    info = dataset_info(name)
    if info.download is None or info.folder is None:
        return
    root = Path(root).expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    info.download(root)  # torchvision skips what is there and verified
