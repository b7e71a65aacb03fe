"""aTLAS's datasets in the folder layouts its DATASETS.md prescribes, where torchvision has no reader for them.

- DTD, EuroSAT, SUN397, ImageNet: class folders per split, read as torchvision's `ImageFolder` reads them
  (aTLAS's readers are `ImageFolder`s): `dtd/{train,val}/`, `EuroSAT_splits/{train,val,test}/`,
  `sun397/{train,val}/`, `imagenet/{train,val_in_folder or val}/`; the folder aTLAS tests on is kr_vlm's
  `test` (DTD's and SUN397's `val` folder).
- RESISC45: `resisc45/NWPU-RESISC45/<class>/<image>` and the split lists `resisc45/resisc45-<split>.txt`.
- UCF101: `UCF-101-midframes/` holding CoOp's `split_zhou_UCF101.json` (aTLAS reads CoOp's split file).
- CUB200: `CUB_200_2011/` as distributed (`images.txt`, `image_class_labels.txt`, `train_test_split.txt`).
- PascalVOC: `VOCdevkit/VOC2007/` as distributed; aTLAS classifies every annotated object, cropped out of
  its photo (`PASCALVoc2007Cropped`): a sample is ``<photo>#<object number>``.

Class labels are the index of the class folder in the sorted list of the training split's folders, so
every split shares one table; class names are made from the folder names as aTLAS makes them.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

from kr_vlm.data.atlas import atlas_classnames, metadata
from kr_vlm.data.base import MalformedDatasetError, load_rgb_image
from kr_vlm.data.datasets.common import Samples, classnames_by_label, require_dir, require_file

# VOC's 20 categories in aTLAS's label order (voc2007.py, object_categories).
VOC_CATEGORIES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def _image_folder(split_dir: Path, class_to_idx: dict[str, int]) -> Samples:
    """`ImageFolder`'s samples of `split_dir` (sorted folders, sorted files, image extensions only)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    stray = sorted(
        entry.name for entry in split_dir.iterdir() if entry.is_dir() and entry.name not in class_to_idx
    )
    if stray:
        raise MalformedDatasetError(f"{split_dir} has class folders the training folder lacks: {stray[:10]}.")
    present = {name: label for name, label in class_to_idx.items() if (split_dir / name).is_dir()}
    try:
        return [
            (str(path), int(label))
            for path, label in make_dataset(
                str(split_dir), present, extensions=IMG_EXTENSIONS, allow_empty=True
            )
        ]
    except FileNotFoundError as err:
        raise MalformedDatasetError(f"{split_dir}: {err}") from None


def _classes(train_dir: Path) -> list[str]:
    folders = sorted(
        entry.name for entry in require_dir(train_dir, "training folder").iterdir() if entry.is_dir()
    )
    if not folders:
        raise MalformedDatasetError(f"{train_dir} holds no class folders.")
    return folders


def _folders(dataset_dir: Path, split: str, split_folders: dict[str, str]) -> tuple[Samples, list[str]]:
    classes = _classes(dataset_dir / split_folders["train"])
    class_to_idx = {name: label for label, name in enumerate(classes)}
    split_dir = require_dir(dataset_dir / split_folders[split], f"{split} folder")
    return _image_folder(split_dir, class_to_idx), classes


def read_dtd(dataset_dir: Path, split: str) -> tuple[Samples, list[str]]:
    """`dtd/train/<texture>/` (DTD's train1 + val1) and `dtd/val/<texture>/` (its test1): aTLAS's test set."""
    samples, classes = _folders(dataset_dir, split, {"train": "train", "test": "val"})
    return samples, [name.replace("_", " ") for name in classes]


def _prettified_eurosat(folder: str) -> str:
    """aTLAS's `pretify_classname`: `AnnualCrop` -> `annual crop`, `Industrial` -> `industrial area`."""
    words = re.findall(r"[A-Z](?:[a-z]+|[A-Z]*(?=[A-Z]|$))", folder.replace("_", " "))
    name = " ".join(word.lower() for word in words)
    return f"{name} area" if name.endswith("al") else name


def read_eurosat(dataset_dir: Path, split: str) -> tuple[Samples, list[str]]:
    """`EuroSAT_splits/{train,val,test}/<class>/`; class names mapped to OpenAI CLIP's as aTLAS does."""
    samples, classes = _folders(dataset_dir, split, {"train": "train", "val": "val", "test": "test"})
    names = metadata()["eurosat_classnames"]
    unknown = [folder for folder in classes if _prettified_eurosat(folder) not in names]
    if unknown:
        raise MalformedDatasetError(
            f"{dataset_dir}: class folders {unknown} are not EuroSAT's ten classes (AnnualCrop, Forest, ...)."
        )
    return samples, [names[_prettified_eurosat(folder)] for folder in classes]


def read_sun397(dataset_dir: Path, split: str) -> tuple[Samples, list[str]]:
    """`sun397/train/<a_abbey>/` (SUN397's Training_01) and `sun397/val/` (its Testing_01): aTLAS's test set."""
    samples, classes = _folders(dataset_dir, split, {"train": "train", "test": "val"})
    return samples, [name[2:].replace("_", " ") for name in classes]


def read_imagenet(dataset_dir: Path, split: str) -> tuple[Samples, list[str]]:
    """`imagenet/train/<wnid>/` and `imagenet/val_in_folder/<wnid>/` (else `imagenet/val/<wnid>/`): aTLAS's
    ImageNet; class names are OpenAI CLIP's (open_clip's `IMAGENET_CLASSNAMES`, aTLAS's list)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    test = "val_in_folder" if (dataset_dir / "val_in_folder").is_dir() else "val"
    samples, classes = _folders(dataset_dir, split, {"train": "train", "test": test})
    if len(classes) != len(IMAGENET_CLASSNAMES):
        raise MalformedDatasetError(
            f"{dataset_dir / 'train'} holds {len(classes)} class folders, not ImageNet's "
            f"{len(IMAGENET_CLASSNAMES)} (one per wnid)."
        )
    return samples, list(IMAGENET_CLASSNAMES)


def read_resisc45(dataset_dir: Path, split: str) -> tuple[Samples, list[str]]:
    """`resisc45/NWPU-RESISC45/<class>/<image>`, the images of `resisc45/resisc45-<split>.txt` (file names)."""
    which = "test" if split == "test" else "train"
    listed = {
        line.strip()
        for line in require_file(dataset_dir / f"resisc45-{which}.txt", "split list").read_text().splitlines()
        if line.strip()
    }
    image_root = dataset_dir / "NWPU-RESISC45"
    classes = _classes(image_root)
    names = atlas_classnames("RESISC45")
    if [name.replace("_", " ") for name in classes] != names:
        raise MalformedDatasetError(
            f"{image_root} must hold RESISC45's 45 class folders (airplane, airport, ...); found {classes[:10]}."
        )
    everything = _image_folder(image_root, {name: label for label, name in enumerate(classes)})
    return [(path, label) for path, label in everything if Path(path).name in listed], names


def read_ucf101(dataset_dir: Path, split: str) -> tuple[Samples, list[str]]:
    """`UCF-101-midframes/<Action>/*.jpg` with CoOp's `split_zhou_UCF101.json` inside; class names as the
    split file writes them (aTLAS keeps the underscores: `Apply_Eye_Makeup`)."""
    split_path = require_file(dataset_dir / "split_zhou_UCF101.json", "CoOp split file")
    try:
        table = json.loads(split_path.read_text(encoding="utf-8"))
        entries = {key: [(str(p), int(label), str(name)) for p, label, name in table[key]] for key in table}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise MalformedDatasetError(f"{split_path} is not CoOp's split file ({err}).") from None
    all_entries = [entry for key in ("train", "val", "test") for entry in entries.get(key, [])]
    classnames = classnames_by_label(((label, name) for _, label, name in all_entries), str(split_path))
    return [(str(dataset_dir / path), label) for path, label, _ in entries[split]], classnames


def _lines(path: Path) -> list[list[str]]:
    return [line.split() for line in require_file(path, "CUB file").read_text().splitlines() if line.strip()]


def read_cub200(dataset_dir: Path, split: str) -> tuple[Samples, list[str]]:
    """`CUB_200_2011/` as distributed: images in `images.txt` order, the official train/test split."""
    paths = {image_id: path for image_id, path in _lines(dataset_dir / "images.txt")}
    labels = {image_id: int(label) - 1 for image_id, label in _lines(dataset_dir / "image_class_labels.txt")}
    training = {image_id: flag == "1" for image_id, flag in _lines(dataset_dir / "train_test_split.txt")}
    names = [name.split(".")[-1].replace("_", " ") for _, name in _lines(dataset_dir / "classes.txt")]
    images = require_dir(dataset_dir / "images", "image folder")
    wanted = split != "test"
    samples = [
        (str(images / path), labels[image_id])
        for image_id, path in paths.items()
        if image_id in labels and training.get(image_id) == wanted
    ]
    return samples, names


class VocCrops:
    """The object of sample ``<photo>#<number>`` cropped out of its photo (picklable for loader workers)."""

    def __init__(self, boxes: dict[str, tuple[int, int, int, int]]) -> None:
        self.boxes = boxes

    @staticmethod
    def file_of(sample: str) -> str:
        """The photo file the object of `sample` is cut out of."""
        return sample.rpartition("#")[0]

    def __call__(self, sample: str) -> Image.Image:
        return load_rgb_image(self.file_of(sample)).crop(self.boxes[sample])


def read_pascal_voc(dataset_dir: Path, split: str) -> tuple[Samples, list[str], VocCrops]:
    """`VOCdevkit/VOC2007/{ImageSets/Main/aeroplane_<split>.txt, Annotations/, JPEGImages/}`: every object of
    every listed photo, in file order (aTLAS's `PASCALVoc2007Cropped`)."""
    voc = dataset_dir / "VOC2007"
    listing = require_file(voc / "ImageSets" / "Main" / f"aeroplane_{split}.txt", "VOC split list")
    photo_ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    label_of = {category: label for label, category in enumerate(VOC_CATEGORIES)}
    samples: Samples = []
    boxes: dict[str, tuple[int, int, int, int]] = {}
    for photo_id in photo_ids:
        annotation = require_file(voc / "Annotations" / f"{photo_id}.xml", "VOC annotation")
        photo = voc / "JPEGImages" / f"{photo_id}.jpg"
        for number, obj in enumerate(ET.parse(annotation).findall("object")):
            box = obj.find("bndbox")
            category = obj.findtext("name", "").strip()
            if box is None or category not in label_of:
                raise MalformedDatasetError(f"{annotation}: object {number} has no box or an unknown name.")
            sample = f"{photo}#{number}"
            boxes[sample] = tuple(int(box.findtext(side)) for side in ("xmin", "ymin", "xmax", "ymax"))
            samples.append((sample, label_of[category]))
    return samples, atlas_classnames("PascalVOC"), VocCrops(boxes)
