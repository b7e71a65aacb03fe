"""aTLAS's datasets that torchvision reads, in torchvision's on-disk formats, read through `torchvision.datasets`.

Each reader takes `(dataset_dir, split)` (the folder the registry names under the data root) and returns
`(samples, classnames)`, or `(samples, classnames, open_image)` where samples are not image files:

- MNIST, SVHN, CIFAR-10/100 and STL-10 keep their images in arrays (idx files, .mat, pickles, binaries).
  A sample is ``<folder>/<split>#<index>``, its index in torchvision's order, and `TorchvisionImages`
  hands out the image of an index; the arrays are read once a process.
- The others are image files: their paths and labels are taken from the torchvision dataset object, as
  torchvision lists them.

aTLAS's splits: `train` is torchvision's training split (OxfordIIITPet: `trainval`), `test` its test split,
`val` the dataset's own validation split where aTLAS uses it (Flowers102, FGVCAircraft, Country211
`valid`), else aTLAS's held-out images of `train` (the registry's `val_in_train`). Caltech101 / 256 have
no split: aTLAS's 80 / 20 random split (`kr_vlm.data.atlas.caltech_split_indices`).

Nothing is downloaded here (`download=False`); `download(name, root)` is what `data.download=true` runs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image

from kr_vlm.data.atlas import atlas_classnames, caltech_split_indices
from kr_vlm.data.base import DatasetNotFoundError, MalformedDatasetError
from kr_vlm.data.datasets.common import Samples

Read = tuple[Samples, list[str]] | tuple[Samples, list[str], Callable[[str], Image.Image]]


def _torchvision_class(class_name: str) -> type:
    import torchvision.datasets

    return getattr(torchvision.datasets, class_name)


@lru_cache(maxsize=8)
def _open(class_name: str, root: str, options: tuple[tuple[str, Any], ...]) -> Any:
    """The torchvision dataset `class_name(root, **options)`, read once a process (no download)."""
    try:
        return _torchvision_class(class_name)(root, download=False, **dict(options))
    except RuntimeError as err:
        # torchvision's "Dataset not found or corrupted. You can use download=True to download it"
        raise DatasetNotFoundError(f"torchvision's {class_name} cannot read {root}: {err}") from None
    except (OSError, ValueError, KeyError, IndexError) as err:
        # A file missing, or not in the format torchvision expects.
        raise MalformedDatasetError(
            f"torchvision's {class_name} cannot read {root} ({type(err).__name__}: {err}): see data/README.md "
            "for the files it needs."
        ) from None


class TorchvisionImages:
    """The image of sample ``<source>#<index>``: item `index` of a torchvision dataset, opened on first use.

    Picklable (DataLoader workers): it holds the class name and options, not the arrays; each process
    reads them once (`_open` is cached), and a forked worker inherits the parent's copy.
    """

    def __init__(self, class_name: str, root: str, options: tuple[tuple[str, Any], ...]) -> None:
        self.class_name, self.root, self.options = class_name, root, options

    @staticmethod
    def file_of(sample: str) -> None:
        """No file of its own: the sample is an index into arrays read from the dataset's files."""
        return None

    def __call__(self, sample: str) -> Image.Image:
        index = int(sample.rpartition("#")[2])
        return _open(self.class_name, self.root, self.options)[index][0]


def _array_set(
    dataset_dir: Path, split: str, class_name: str, root: Path, options: dict[str, Any], labels_attr: str
) -> Read:
    frozen = tuple(sorted(options.items()))
    dataset = _open(class_name, str(root), frozen)
    labels = [int(label) for label in getattr(dataset, labels_attr)]
    samples = [(f"{dataset_dir}/{split}#{index:06d}", label) for index, label in enumerate(labels)]
    return samples, _classes_of(dataset, class_name), TorchvisionImages(class_name, str(root), frozen)


def _classes_of(dataset: Any, class_name: str) -> list[str]:
    if class_name in ("MNIST", "SVHN"):
        return [str(digit) for digit in range(10)]  # aTLAS: ['0', ..., '9']
    return [str(name) for name in dataset.classes]


def _train_or_test(split: str) -> str:
    # aTLAS selects on held-out training images for these sets: the registry carves `val` out of `train`.
    return "test" if split == "test" else "train"


def read_mnist(dataset_dir: Path, split: str) -> Read:
    """`<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte` (dataset_dir is `MNIST/raw`)."""
    train = _train_or_test(split) == "train"
    return _array_set(dataset_dir, split, "MNIST", dataset_dir.parent.parent, {"train": train}, "targets")


def read_svhn(dataset_dir: Path, split: str) -> Read:
    """`<root>/svhn/{train,test}_32x32.mat` (aTLAS passes `<root>/svhn` as torchvision's root)."""
    return _array_set(dataset_dir, split, "SVHN", dataset_dir, {"split": _train_or_test(split)}, "labels")


def read_cifar(dataset_dir: Path, split: str, *, class_name: str) -> Read:
    """`<root>/cifar-10-batches-py/` or `<root>/cifar-100-python/` (torchvision's pickled batches)."""
    train = _train_or_test(split) == "train"
    return _array_set(dataset_dir, split, class_name, dataset_dir.parent, {"train": train}, "targets")


def read_stl10(dataset_dir: Path, split: str) -> Read:
    """`<root>/stl10/stl10_binary/` (aTLAS passes `<root>/stl10` as torchvision's root)."""
    return _array_set(dataset_dir, split, "STL10", dataset_dir, {"split": _train_or_test(split)}, "labels")


def _files(dataset: Any, paths_attr: str, labels_attr: str | None) -> Samples:
    if labels_attr is None:  # a list of (path, label)
        return [(str(path), int(label)) for path, label in getattr(dataset, paths_attr)]
    return [
        (str(path), int(label))
        for path, label in zip(getattr(dataset, paths_attr), getattr(dataset, labels_attr), strict=True)
    ]


def read_gtsrb(dataset_dir: Path, split: str) -> Read:
    """`<root>/gtsrb/GTSRB/Training/<class>/*.ppm`, `GTSRB/Final_Test/Images/`, `GT-final_test.csv`; class
    names as aTLAS writes them (OpenAI CLIP's GTSRB prompts)."""
    dataset = _open("GTSRB", str(dataset_dir.parent), (("split", _train_or_test(split)),))
    return _files(dataset, "_samples", None), atlas_classnames("GTSRB")


def read_food101(dataset_dir: Path, split: str) -> Read:
    """`<root>/food-101/{images, meta/{train,test}.json}`; class names with `_` as spaces (aTLAS)."""
    dataset = _open("Food101", str(dataset_dir.parent), (("split", _train_or_test(split)),))
    return _files(dataset, "_image_files", "_labels"), [name.replace("_", " ") for name in dataset.classes]


def read_flowers102(dataset_dir: Path, split: str) -> Read:
    """`<root>/flowers-102/{jpg/, imagelabels.mat, setid.mat}`; aTLAS's class names."""
    dataset = _open("Flowers102", str(dataset_dir.parent), (("split", split),))
    return _files(dataset, "_image_files", "_labels"), atlas_classnames("Flowers102")


def read_oxford_pets(dataset_dir: Path, split: str) -> Read:
    """`<root>/oxford-iiit-pet/{images/, annotations/{trainval,test}.txt}`; torchvision's class names."""
    which = "test" if split == "test" else "trainval"
    dataset = _open("OxfordIIITPet", str(dataset_dir.parent), (("split", which),))
    return _files(dataset, "_images", "_labels"), list(dataset.classes)


def read_country211(dataset_dir: Path, split: str) -> Read:
    """`<root>/country211/{train,valid,test}/<ISO code>/`; aTLAS's country names."""
    which = "valid" if split == "val" else split
    dataset = _open("Country211", str(dataset_dir.parent), (("split", which),))
    return _files(dataset, "samples", None), atlas_classnames("Country211")


def read_fgvc_aircraft(dataset_dir: Path, split: str) -> Read:
    """`<root>/fgvc-aircraft-2013b/data/{images/, variants.txt, images_variant_<split>.txt}`."""
    options = (("annotation_level", "variant"), ("split", split))
    dataset = _open("FGVCAircraft", str(dataset_dir.parent), options)
    return _files(dataset, "_image_files", "_labels"), list(dataset.classes)


def read_stanford_cars(dataset_dir: Path, split: str) -> Read:
    """`<root>/stanford_cars/{cars_train/, cars_test/, devkit/{cars_meta,cars_train_annos}.mat,
    cars_test_annos_withlabels.mat}`."""
    dataset = _open("StanfordCars", str(dataset_dir.parent), (("split", _train_or_test(split)),))
    return _files(dataset, "_samples", None), [name.replace("_", " ") for name in dataset.classes]


def _caltech_file(dataset: Any, folder: str, index: int) -> str:
    category = dataset.categories[dataset.y[index]]
    number = dataset.index[index]
    if folder == "101_ObjectCategories":
        return f"{dataset.root}/{folder}/{category}/image_{number:04d}.jpg"
    return f"{dataset.root}/{folder}/{category}/{dataset.y[index] + 1:03d}_{number:04d}.jpg"


def read_caltech(dataset_dir: Path, split: str, *, class_name: str) -> Read:
    """`<root>/caltech101/101_ObjectCategories/` or `<root>/caltech256/256_ObjectCategories/`, split 80/20
    as aTLAS does; class names as aTLAS makes them from the folder names."""
    folder = "101_ObjectCategories" if class_name == "Caltech101" else "256_ObjectCategories"
    dataset = _open(class_name, str(dataset_dir.parent), ())
    indices = caltech_split_indices(len(dataset.y), _train_or_test(split))
    samples = [(_caltech_file(dataset, folder, index), int(dataset.y[index])) for index in indices]
    names = [name.split(".")[-1].replace("-", " ").replace(" 101", "") for name in dataset.categories]
    return samples, names


# What `data.download=true` calls, by registry name: torchvision's class and the options of each split.
DOWNLOADS: dict[str, tuple[str, str, list[dict[str, Any]]]] = {
    # name: (torchvision class, where its root is relative to the data root, one options dict per split)
    "mnist": ("MNIST", ".", [{"train": True}, {"train": False}]),
    "svhn": ("SVHN", "svhn", [{"split": "train"}, {"split": "test"}]),
    "cifar10": ("CIFAR10", ".", [{"train": True}]),
    "cifar100": ("CIFAR100", ".", [{"train": True}]),
    "stl10": ("STL10", "stl10", [{"split": "train"}]),
    "gtsrb": ("GTSRB", ".", [{"split": "train"}, {"split": "test"}]),
    "food101_atlas": ("Food101", ".", [{"split": "train"}]),
    "oxford_flowers_atlas": ("Flowers102", ".", [{"split": "train"}]),
    "oxford_pets_atlas": ("OxfordIIITPet", ".", [{"split": "trainval"}]),
    "country211": ("Country211", ".", [{"split": "train"}]),
    "fgvc_aircraft_atlas": ("FGVCAircraft", ".", [{"split": "train"}]),
    "caltech101_atlas": ("Caltech101", ".", [{}]),
    "caltech256": ("Caltech256", ".", [{}]),
}


def download_hint(name: str) -> str:
    """How to fetch dataset `name` with torchvision, for messages (`{root}` stands for the data root)."""
    class_name, where, splits = DOWNLOADS[name]
    root = "{root}" if where == "." else f"{{root}}/{where}"
    options = "".join(f", {key}={value!r}" for key, value in splits[0].items())
    return (
        f"set data.download=true to fetch it with torchvision "
        f"(torchvision.datasets.{class_name}('{root}'{options}, download=True))"
    )


def download(name: str, root: Path) -> None:
    """Fetch dataset `name` into the data root `root` with torchvision (`download=True`)."""
    class_name, where, splits = DOWNLOADS[name]
    target = root if where == "." else root / where
    for options in splits:
        _torchvision_class(class_name)(str(target), download=True, **options)
