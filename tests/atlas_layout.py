"""Write tiny copies of aTLAS's 22 datasets for tests, in the formats torchvision and aTLAS read (importable:
`from atlas_layout import make_atlas_dataset, accept_fabricated_files, label_of`).

As torchvision's own dataset tests do (test/datasets_utils.py of pytorch/vision), each format is written
for real at a tiny size: MNIST's idx files, CIFAR's pickled batches, SVHN's and Flowers102's / Cars' .mat
files (scipy), STL-10's binaries, GTSRB's .ppm folders and CSV, the folder layouts and split lists.
Every image is one flat colour made from its label (`label_colour`), so `label_of(image)` tells which
label the pixels were written with: a reader whose labels drift from its images fails the tests.
torchvision checks the MD5 of CIFAR, SVHN, STL-10 and Flowers102 files against the originals;
`accept_fabricated_files` makes those checks look for the file only, as torchvision's tests patch them.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from coop_layout import FakeDataset
from kr_vlm.data.atlas import atlas_classnames, atlas_val_indices, caltech_split_indices, metadata

SIZE = 16  # side of the written images (MNIST 28, CIFAR/SVHN 32, STL-10 96: their formats' fixed sizes)
EUROSAT_FOLDERS = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial"]


def label_colour(label: int) -> tuple[int, int, int]:
    return (30 * label + 15, 200 - 20 * label, 90)


def label_of(image: Image.Image) -> int:
    """The label an image written by this module was made from (its centre pixel's red level)."""
    red = image.convert("RGB").getpixel((image.width // 2, image.height // 2))[0]
    return round((red - 15) / 30)


def _image(path: Path, label: int, size: int = SIZE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), label_colour(label)).save(path)


def accept_fabricated_files(monkeypatch) -> None:
    """torchvision's MD5 checks of the files it knows look for the file alone (torchvision's tests do so)."""
    import torchvision.datasets.cifar
    import torchvision.datasets.flowers102
    import torchvision.datasets.stl10
    import torchvision.datasets.svhn

    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    for module in (torchvision.datasets.cifar, torchvision.datasets.svhn, torchvision.datasets.stl10,
                   torchvision.datasets.flowers102):  # fmt: skip
        monkeypatch.setattr(module, "check_integrity", exists)


def _labels(classes: int, per_class: int) -> list[int]:
    """Labels interleaved (0, 1, 2, 0, 1, 2, ...), so no reader gets them right by counting."""
    return [index % classes for index in range(classes * per_class)]


def _counts(train: list[int], test: list[int], val: list[int] | None = None) -> dict[str, int]:
    return {"train": len(train), "val": len(atlas_val_indices(len(train))) if val is None else len(val),
            "test": len(test)}  # fmt: skip


# -------------------------------------------------------------------------------------- array formats


def _mnist(root: Path, classes: int, per_class: int) -> FakeDataset:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    splits = {"train": _labels(classes, per_class), "t10k": _labels(classes, per_class)[::-1]}
    for prefix, labels in splits.items():
        images = np.stack([np.full((28, 28), label_colour(label)[0], np.uint8) for label in labels])
        header = struct.pack(">IIII", 0x0803, len(labels), 28, 28)  # idx3 of uint8
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x0801, len(labels)) + bytes(labels)
        )
    return FakeDataset(raw, [str(digit) for digit in range(10)], _counts(splits["train"], splits["t10k"]))


def _rgb_rows(labels: list[int], side: int) -> np.ndarray:
    """CIFAR's and STL-10's row layout: N x (3 planes of side x side)."""
    return np.stack([np.repeat(np.array(label_colour(label), np.uint8), side * side) for label in labels])


def _cifar(root: Path, classes: int, per_class: int, hundred: bool) -> FakeDataset:
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    names = [f"thing{label}" for label in range(classes)]
    label_key = "fine_labels" if hundred else "labels"
    train, test = _labels(classes, per_class), _labels(classes, per_class)[::-1]
    files = {"train": [train], "test": [test]} if hundred else {
        **{f"data_batch_{i}": [train[i - 1 :: 5]] for i in range(1, 6)}, "test_batch": [test]
    }  # fmt: skip
    for filename, (labels,) in files.items():
        with open(folder / filename, "wb") as handle:
            pickle.dump({"data": _rgb_rows(labels, 32), label_key: labels}, handle)
    meta = ("meta", "fine_label_names") if hundred else ("batches.meta", "label_names")
    with open(folder / meta[0], "wb") as handle:
        pickle.dump({meta[1]: names}, handle)
    # torchvision concatenates data_batch_1..5: sample i of batch b is train[b-1 + 5 i]
    order = train if hundred else [label for i in range(5) for label in train[i::5]]
    return FakeDataset(folder, names, _counts(order, test))


def _svhn(root: Path, classes: int, per_class: int) -> FakeDataset:
    from scipy.io import savemat

    folder = root / "svhn"
    folder.mkdir(parents=True)
    train, test = _labels(classes, per_class), _labels(classes, per_class)[::-1]
    for split, labels in (("train", train), ("test", test)):
        images = np.stack([np.full((32, 32, 3), label_colour(label), np.uint8) for label in labels], axis=-1)
        savemat(
            folder / f"{split}_32x32.mat", {"X": images, "y": np.array([[label or 10] for label in labels])}
        )
    return FakeDataset(folder, [str(digit) for digit in range(10)], _counts(train, test))


def _stl10(root: Path, classes: int, per_class: int) -> FakeDataset:
    folder = root / "stl10" / "stl10_binary"
    folder.mkdir(parents=True)
    names = [f"animal{label}" for label in range(classes)]
    train, test = _labels(classes, per_class), _labels(classes, per_class)[::-1]
    for split, labels in (("train", train), ("test", test)):
        (folder / f"{split}_X.bin").write_bytes(_rgb_rows(labels, 96).tobytes())
        (folder / f"{split}_y.bin").write_bytes(bytes(label + 1 for label in labels))
    (folder / "unlabeled_X.bin").write_bytes(b"")
    (folder / "class_names.txt").write_text("".join(f"{name}\n" for name in names))
    return FakeDataset(root / "stl10", names, _counts(train, test))


# ---------------------------------------------------------------------------------- torchvision folders


def _gtsrb(root: Path, classes: int, per_class: int) -> FakeDataset:
    base = root / "gtsrb"
    train = _labels(classes, per_class)
    for index, label in enumerate(train):
        _image(base / "GTSRB" / "Training" / f"{label:05d}" / f"{label:05d}_{index:05d}.ppm", label)
    test = train[::-1]
    rows = []
    for index, label in enumerate(test):
        _image(base / "GTSRB" / "Final_Test" / "Images" / f"{index:05d}.ppm", label)
        rows.append({"Filename": f"{index:05d}.ppm", "ClassId": label})
    with open(base / "GT-final_test.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["Filename", "ClassId"], delimiter=";")
        writer.writeheader()
        writer.writerows(rows)
    return FakeDataset(base, atlas_classnames("GTSRB"), _counts(train, test))


def _food101(root: Path, classes: int, per_class: int) -> FakeDataset:
    base = root / "food-101"
    dishes = [f"dish_{chr(97 + label)}" for label in range(classes)]
    counts = {}
    for split in ("train", "test"):
        meta = {dish: [] for dish in dishes}
        for index, label in enumerate(_labels(classes, per_class)):
            meta[dishes[label]].append(f"{dishes[label]}/{split}{index}")
            _image(base / "images" / dishes[label] / f"{split}{index}.jpg", label)
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
        counts[split] = classes * per_class
    counts["val"] = len(atlas_val_indices(counts["train"]))
    return FakeDataset(base, [dish.replace("_", " ") for dish in dishes], counts)


def _flowers102(root: Path, classes: int, per_class: int) -> FakeDataset:
    from scipy.io import savemat

    base = root / "flowers-102"
    labels = _labels(classes, 3 * per_class)
    for image_id, label in enumerate(labels, start=1):
        _image(base / "jpg" / f"image_{image_id:05d}.jpg", label)
    ids = np.arange(1, len(labels) + 1)
    savemat(base / "imagelabels.mat", {"labels": np.array([label + 1 for label in labels])})
    savemat(base / "setid.mat", {"trnid": ids[0::3], "valid": ids[1::3], "tstid": ids[2::3]})
    counts = {"train": len(ids[0::3]), "val": len(ids[1::3]), "test": len(ids[2::3])}
    return FakeDataset(base, atlas_classnames("Flowers102"), counts)


def _oxford_pets(root: Path, classes: int, per_class: int) -> FakeDataset:
    base = root / "oxford-iiit-pet"
    breeds = ["great_pyrenees", "Abyssinian", "basset_hound", "Bengal"][:classes]
    (base / "annotations").mkdir(parents=True)
    counts = {}
    for split in ("trainval", "test"):
        lines = []
        for index, label in enumerate(_labels(classes, per_class)):
            image_id = f"{breeds[label]}_{split}{index}"
            _image(base / "images" / f"{image_id}.jpg", label)
            lines.append(f"{image_id} {label + 1} 1 {label + 1}\n")
        (base / "annotations" / f"{split}.txt").write_text("".join(lines))
        counts["train" if split == "trainval" else "test"] = len(lines)
    counts["val"] = len(atlas_val_indices(counts["train"]))
    names = [" ".join(part.title() for part in breed.split("_")) for breed in breeds]
    return FakeDataset(base, names, counts)


def _country211(root: Path, classes: int, per_class: int) -> FakeDataset:
    base = root / "country211"
    codes = ["AD", "AE", "AF", "AG"][:classes]
    for split in ("train", "valid", "test"):
        for index, label in enumerate(_labels(classes, per_class)):
            _image(base / split / codes[label] / f"{split}{index}.jpg", label)
    n = classes * per_class
    return FakeDataset(base, atlas_classnames("Country211"), {"train": n, "val": n, "test": n})


def _fgvc_aircraft(root: Path, classes: int, per_class: int) -> FakeDataset:
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = [f"7{label}7-200" for label in range(classes)]
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("".join(f"{variant}\n" for variant in variants))
    counts = {}
    for split in ("train", "val", "test"):
        lines = []
        for index, label in enumerate(_labels(classes, per_class)):
            image_id = f"{split}{index:05d}"
            _image(data / "images" / f"{image_id}.jpg", label)
            lines.append(f"{image_id} {variants[label]}\n")
        (data / f"images_variant_{split}.txt").write_text("".join(lines))
        counts[split] = len(lines)
    return FakeDataset(data.parent, variants, counts)


def _stanford_cars(root: Path, classes: int, per_class: int) -> FakeDataset:
    from scipy.io import savemat

    base = root / "stanford_cars"
    names = [f"AM General Hummer SUV 200{label}" for label in range(classes)]
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(names, dtype=object)[None, :]})
    counts = {}
    for split, annotations_file in (("train", base / "devkit" / "cars_train_annos.mat"),
                                    ("test", base / "cars_test_annos_withlabels.mat")):  # fmt: skip
        records = np.zeros((1, classes * per_class), dtype=[("class", "O"), ("fname", "O")])
        for index, label in enumerate(_labels(classes, per_class)):
            fname = f"{index:05d}.jpg"
            _image(base / f"cars_{split}" / fname, label)
            records[0, index] = (np.array([[label + 1]]), np.array([fname]))
        savemat(annotations_file, {"annotations": records})
        counts[split] = classes * per_class
    counts["val"] = len(atlas_val_indices(counts["train"]))
    return FakeDataset(base, names, counts)


def _caltech(root: Path, classes: int, per_class: int, which: int) -> FakeDataset:
    base = root / f"caltech{which}" / f"{which}_ObjectCategories"
    folders = ["accordion", "airplanes", "anchor", "ant"][:classes]
    if which == 256:
        folders = [f"{label + 1:03d}.{name}" for label, name in enumerate(["ak47", "american-flag", "backpack",
                                                                            "baseball-bat"][:classes])]  # fmt: skip
    else:
        (base / "BACKGROUND_Google").mkdir(parents=True)
    for label, folder in enumerate(folders):
        for number in range(1, per_class + 2):
            name = f"image_{number:04d}.jpg" if which == 101 else f"{label + 1:03d}_{number:04d}.jpg"
            _image(base / folder / name, label)
    total = classes * (per_class + 1)
    train = caltech_split_indices(total, "train")
    counts = {"train": len(train), "val": len(atlas_val_indices(len(train))), "test": total - len(train)}
    names = [folder.split(".")[-1].replace("-", " ").replace(" 101", "") for folder in folders]
    return FakeDataset(base.parent, names, counts)


# ---------------------------------------------------------------------------------------- aTLAS folders


def _split_folders(base: Path, folders: list[str], splits: dict[str, str], per_class: int) -> dict[str, int]:
    counts = {}
    for split, folder in splits.items():
        for index, label in enumerate(_labels(len(folders), per_class)):
            _image(base / folder / folders[label] / f"{split}_{index:03d}.jpg", label)
        counts[split] = len(folders) * per_class
    counts.setdefault("val", len(atlas_val_indices(counts["train"])))
    return counts


def _dtd(root: Path, classes: int, per_class: int) -> FakeDataset:
    folders = ["banded", "blotchy", "braided", "bubbly"][:classes]
    counts = _split_folders(root / "dtd", folders, {"train": "train", "test": "val"}, per_class)
    return FakeDataset(root / "dtd", folders, counts)


def _eurosat(root: Path, classes: int, per_class: int) -> FakeDataset:
    folders = EUROSAT_FOLDERS[:classes]
    splits = {"train": "train", "val": "val", "test": "test"}
    counts = _split_folders(root / "EuroSAT_splits", folders, splits, per_class)
    names = metadata()["eurosat_classnames"]
    pretty = {"AnnualCrop": "annual crop", "Forest": "forest", "HerbaceousVegetation": "herbaceous vegetation",
              "Highway": "highway", "Industrial": "industrial area"}  # fmt: skip
    return FakeDataset(root / "EuroSAT_splits", [names[pretty[folder]] for folder in folders], counts)


def _sun397(root: Path, classes: int, per_class: int) -> FakeDataset:
    folders = ["a_abbey", "a_airplane_cabin", "b_badlands", "b_bakery_shop"][:classes]
    counts = _split_folders(root / "sun397", folders, {"train": "train", "test": "val"}, per_class)
    return FakeDataset(root / "sun397", [folder[2:].replace("_", " ") for folder in folders], counts)


def _imagenet(root: Path, classes: int, per_class: int) -> FakeDataset:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    base = root / "imagenet"
    wnids = [f"n{index:08d}" for index in range(len(IMAGENET_CLASSNAMES))]
    for wnid in wnids:  # 1000 class folders, most of them empty
        (base / "train" / wnid).mkdir(parents=True)
    counts = _split_folders(base, wnids[:classes], {"train": "train", "test": "val_in_folder"}, per_class)
    return FakeDataset(base, list(IMAGENET_CLASSNAMES), counts)


def _resisc45(root: Path, classes: int, per_class: int) -> FakeDataset:
    base = root / "resisc45"
    folders = [name.replace(" ", "_") for name in atlas_classnames("RESISC45")]
    lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for label, folder in enumerate(folders):
        (base / "NWPU-RESISC45" / folder).mkdir(parents=True)
        if label >= classes:
            continue
        for number in range(3 * per_class):
            filename = f"{folder}_{number + 1:03d}.jpg"
            _image(base / "NWPU-RESISC45" / folder / filename, label)
            lists[("train", "val", "test")[number % 3]].append(filename)
    for split, files in lists.items():
        (base / f"resisc45-{split}.txt").write_text("".join(f"{name}\n" for name in files))
    counts = {"train": len(lists["train"]), "test": len(lists["test"])}
    counts["val"] = len(atlas_val_indices(counts["train"]))
    return FakeDataset(base, atlas_classnames("RESISC45"), counts)


def _ucf101(root: Path, classes: int, per_class: int) -> FakeDataset:
    base = root / "UCF-101-midframes"
    actions = ["Apply_Eye_Makeup", "Archery", "Baby_Crawling", "Band_Marching"][:classes]
    table = {}
    for split in ("train", "val", "test"):
        entries = []
        for index, label in enumerate(_labels(classes, per_class)):
            relative = f"{actions[label]}/v_{split}_{index:03d}.jpg"
            _image(base / relative, label)
            entries.append([relative, label, actions[label]])
        table[split] = sorted(entries, key=lambda entry: entry[1])  # CoOp's files list class by class
    (base / "split_zhou_UCF101.json").write_text(json.dumps(table))
    n = classes * per_class
    return FakeDataset(base, actions, {"train": n, "val": n, "test": n})


def _cub200(root: Path, classes: int, per_class: int) -> FakeDataset:
    base = root / "CUB_200_2011"
    folders = [f"{label + 1:03d}.Black_footed_Albatross{label}" for label in range(classes)]
    images, labels, training = [], [], []
    for image_id, label in enumerate(_labels(classes, 2 * per_class), start=1):
        path = f"{folders[label]}/{folders[label].split('.')[1]}_{image_id:04d}.jpg"
        _image(base / "images" / path, label)
        images.append(f"{image_id} {path}\n")
        labels.append(f"{image_id} {label + 1}\n")
        training.append(f"{image_id} {int(image_id % 2 == 0)}\n")
    for filename, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                            ("train_test_split.txt", training)):  # fmt: skip
        (base / filename).write_text("".join(lines))
    (base / "classes.txt").write_text(
        "".join(f"{label + 1} {folder}\n" for label, folder in enumerate(folders))
    )
    n = classes * per_class
    names = [folder.split(".")[-1].replace("_", " ") for folder in folders]
    return FakeDataset(base, names, {"train": n, "val": len(atlas_val_indices(n)), "test": n})


VOC_CATEGORIES = ("aeroplane", "bicycle", "bird", "boat")


def _pascal_voc(root: Path, classes: int, per_class: int) -> FakeDataset:
    """Photos of two objects each (left and right half): every object is a sample, cropped to its box."""
    voc = root / "VOCdevkit" / "VOC2007"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    counts = {}
    for split in ("train", "val", "test"):
        labels = _labels(classes, per_class)
        photo_ids = []
        for pair in range(0, len(labels), 2):
            photo_id = f"{split}{pair:04d}"
            photo = np.zeros((SIZE, SIZE, 3), np.uint8)
            objects = []
            for side, label in enumerate(labels[pair : pair + 2]):
                box = (side * SIZE // 2, 0, (side + 1) * SIZE // 2, SIZE)
                photo[:, box[0] : box[2]] = label_colour(label)
                objects.append(
                    f"<object><name>{VOC_CATEGORIES[label]}</name><difficult>0</difficult><bndbox>"
                    f"<xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax>"
                    "</bndbox></object>"
                )
            (voc / "JPEGImages").mkdir(exist_ok=True)
            Image.fromarray(photo).save(voc / "JPEGImages" / f"{photo_id}.jpg", quality=100)
            (voc / "Annotations" / f"{photo_id}.xml").write_text(
                f"<annotation><filename>{photo_id}.jpg</filename>{''.join(objects)}</annotation>"
            )
            photo_ids.append(photo_id)
        (voc / "ImageSets" / "Main" / f"aeroplane_{split}.txt").write_text(
            "".join(f"{photo_id} -1\n" for photo_id in photo_ids)
        )
        counts[split] = len(labels)
    return FakeDataset(voc.parent, atlas_classnames("PascalVOC"), counts)


WRITERS = {
    "stanford_cars_atlas": _stanford_cars,
    "dtd_atlas": _dtd,
    "eurosat_atlas": _eurosat,
    "gtsrb": _gtsrb,
    "mnist": _mnist,
    "resisc45": _resisc45,
    "sun397_atlas": _sun397,
    "svhn": _svhn,
    "cifar10": lambda root, classes, per_class: _cifar(root, classes, per_class, hundred=False),
    "cifar100": lambda root, classes, per_class: _cifar(root, classes, per_class, hundred=True),
    "imagenet_atlas": _imagenet,
    "stl10": _stl10,
    "food101_atlas": _food101,
    "caltech101_atlas": lambda root, classes, per_class: _caltech(root, classes, per_class, 101),
    "caltech256": lambda root, classes, per_class: _caltech(root, classes, per_class, 256),
    "fgvc_aircraft_atlas": _fgvc_aircraft,
    "oxford_flowers_atlas": _flowers102,
    "oxford_pets_atlas": _oxford_pets,
    "cub200": _cub200,
    "pascal_voc": _pascal_voc,
    "country211": _country211,
    "ucf101_atlas": _ucf101,
}


def make_atlas_dataset(root: str | Path, name: str, classes: int = 3, per_class: int = 4) -> FakeDataset:
    """Write aTLAS dataset `name` (kr_vlm's name) under the data root `root`: `classes` classes (at most 4),
    about `per_class` images of each in every split. Returns its folder, expected class names and the
    number of samples of each split (`val`: the dataset's own, or aTLAS's share of `train`)."""
    if not 1 <= classes <= 4:
        raise ValueError("the tiny aTLAS datasets have 1 to 4 classes")
    return WRITERS[name](Path(root), classes, per_class)
