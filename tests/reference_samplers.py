"""The few-shot draws of CoOp / Dassl, CLIP-LoRA and aTLAS / RandLoRA, transcribed from their published code, for tests.

From Dassl `dassl/data/datasets/base_dataset.py` and `dassl/utils/tools.py`, CoOp `train.py` and
`datasets/*.py`, CLIP-LoRA `main.py`, `run_utils.py`, `datasets/utils.py`, `datasets/*.py` and
`datasets/imagenet.py`. They seed and draw from Python's *global* `random`, as the references do;
only what the draw needs is kept (no numpy or torch seeding, no transforms). aTLAS's and RandLoRA's draws
(at the end) use torch's global generator instead.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict

import torchvision

# CoOp's folder and image folder of every dataset (datasets/<name>.py: dataset_dir, image_dir).
COOP_FOLDERS = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "Caltech101"),
    "oxford_pets": ("oxford_pets", "images", "OxfordPets"),
    "stanford_cars": ("stanford_cars", "", "StanfordCars"),  # read_split(split_path, self.dataset_dir)
    "oxford_flowers": ("oxford_flowers", "jpg", "OxfordFlowers"),
    "food101": ("food-101", "images", "Food101"),
    "sun397": ("sun397", "SUN397", "SUN397"),
    "dtd": ("dtd", "images", "DescribableTextures"),
    "eurosat": ("eurosat", "2750", "EuroSAT"),
    "ucf101": ("ucf101", "UCF-101-midframes", "UCF101"),
    "fgvc_aircraft": ("fgvc_aircraft", "images", None),  # no split file: images_variant_*.txt
}


# ---- Dassl, dassl/data/datasets/base_dataset.py ----------------------------------------------


class Datum:
    def __init__(self, impath="", label=0, domain=0, classname=""):
        assert isinstance(impath, str)
        assert os.path.isfile(impath)  # check_isfile

        self._impath = impath
        self._label = label
        self._domain = domain
        self._classname = classname

    @property
    def impath(self):
        return self._impath

    @property
    def label(self):
        return self._label


def split_dataset_by_label(data_source):
    output = defaultdict(list)
    for item in data_source:
        output[item.label].append(item)
    return output


def generate_fewshot_dataset(*data_sources, num_shots=-1, repeat=False):
    # Dassl's default is repeat=False; CLIP-LoRA's copy (datasets/utils.py) is the same with repeat=True.
    if num_shots < 1:
        if len(data_sources) == 1:
            return data_sources[0]
        return data_sources
    output = []
    for data_source in data_sources:
        tracker = split_dataset_by_label(data_source)
        dataset = []
        for label, items in tracker.items():  # noqa: B007 (verbatim)
            if len(items) >= num_shots:
                sampled_items = random.sample(items, num_shots)
            else:
                if repeat:  # noqa: SIM108 (verbatim)
                    sampled_items = random.choices(items, k=num_shots)
                else:
                    sampled_items = items
            dataset.extend(sampled_items)
        output.append(dataset)
    if len(output) == 1:
        return output[0]
    return output


def set_random_seed(seed):  # dassl/utils/tools.py and CLIP-LoRA run_utils.py (numpy and torch left out)
    random.seed(seed)


def listdir_nohidden(path, sort=False):  # dassl/utils/tools.py
    items = [f for f in os.listdir(path) if not f.startswith(".")]
    if sort:
        items.sort()
    return items


# ---- CoOp, datasets/oxford_pets.py (read_split), fgvc_aircraft.py, imagenet.py -------------


def read_split(filepath, path_prefix):
    def _convert(items):
        out = []
        for impath, label, classname in items:
            impath = os.path.join(path_prefix, impath)
            item = Datum(impath=impath, label=int(label), classname=classname)
            out.append(item)
        return out

    with open(filepath) as f:
        split = json.load(f)
    return _convert(split["train"]), _convert(split["val"]), _convert(split["test"])


def read_fgvc(dataset_dir):
    image_dir = os.path.join(dataset_dir, "images")
    classnames = []
    with open(os.path.join(dataset_dir, "variants.txt")) as f:
        for line in f.readlines():
            classnames.append(line.strip())
    cname2lab = {c: i for i, c in enumerate(classnames)}

    def read_data(split_file):
        items = []
        with open(os.path.join(dataset_dir, split_file)) as f:
            for line in f.readlines():
                line = line.strip().split(" ")
                imname = line[0] + ".jpg"
                classname = " ".join(line[1:])
                items.append(Datum(impath=os.path.join(image_dir, imname), label=cname2lab[classname]))
        return items

    return read_data("images_variant_train.txt"), read_data("images_variant_val.txt")


def read_imagenet(dataset_dir, split_dir):
    split_dir = os.path.join(dataset_dir, "images", split_dir)
    folders = sorted(f.name for f in os.scandir(split_dir) if f.is_dir())
    items = []
    for label, folder in enumerate(folders):
        for imname in listdir_nohidden(os.path.join(split_dir, folder)):
            items.append(Datum(impath=os.path.join(split_dir, folder, imname), label=label))
    return items


def read_train_val(root, name):
    folder, image_dir, coop_name = COOP_FOLDERS[name]
    dataset_dir = os.path.join(os.path.abspath(os.path.expanduser(root)), folder)
    if name == "fgvc_aircraft":
        return read_fgvc(dataset_dir)
    split_path = os.path.join(dataset_dir, f"split_zhou_{coop_name}.json")
    train, val, _ = read_split(split_path, os.path.join(dataset_dir, image_dir) if image_dir else dataset_dir)
    return train, val


def coop_draw(root, name, shots, seed):
    """CoOp's train.py (set_random_seed) and the dataset class's few-shot lines."""
    set_random_seed(seed)
    if name == "imagenet":
        dataset_dir = os.path.join(os.path.abspath(os.path.expanduser(root)), "imagenet")
        train, test = read_imagenet(dataset_dir, "train"), read_imagenet(dataset_dir, "val")
        train = generate_fewshot_dataset(train, num_shots=shots)
        return train, test  # super().__init__(train_x=train, val=test, test=test)
    train, val = read_train_val(root, name)
    train = generate_fewshot_dataset(train, num_shots=shots)
    val = generate_fewshot_dataset(val, num_shots=min(shots, 4))
    return train, val


# ---- CLIP-LoRA, main.py, datasets/<name>.py, datasets/imagenet.py ----------------------------


def clip_lora_draw(root, name, shots, seed):
    set_random_seed(seed)  # main.py; clip.load draws nothing from `random` before build_dataset
    if name == "imagenet":
        # CLIP-LoRA reads <root>/imagenet/train; the same images are CoOp's imagenet/images/train.
        train_x = torchvision.datasets.ImageFolder(os.path.join(root, "imagenet", "images", "train"))
        num_shots_val = min(4, shots)
        split_by_label_dict = defaultdict(list)
        for i in range(len(train_x.imgs)):
            split_by_label_dict[train_x.targets[i]].append(train_x.imgs[i])
        imgs, imgs_val = [], []
        for label, items in split_by_label_dict.items():  # noqa: B007 (verbatim)
            samples = random.sample(items, shots + num_shots_val)
            imgs = imgs + samples[0:shots]
            imgs_val = imgs_val + samples[shots : shots + num_shots_val]
        return imgs, imgs_val
    train, val = read_train_val(root, name)
    n_shots_val = min(shots, 4)
    val = generate_fewshot_dataset(val, num_shots=n_shots_val, repeat=True)
    train = generate_fewshot_dataset(train, num_shots=shots, repeat=True)
    return train, val


# ---- aTLAS src/utils.py get_n_shots (= RandLoRA vision_language/src/eval.py), RandLoRA src/finetune.py ------
# Both draw from torch's global generator; `torch.manual_seed(seed)` stands for its state at the draw.


def atlas_get_n_shots(targets, shots, n_class, seed):
    import torch

    torch.manual_seed(seed)
    targets = torch.tensor(targets)
    to_keep = torch.tensor([], dtype=torch.long)
    for c in range(n_class):
        cond = targets == c
        ids_c = torch.arange(len(targets))[cond]
        a = torch.randperm(len(ids_c))
        to_keep = torch.cat((to_keep, ids_c[a[-shots:]]))
    return to_keep.tolist()


def randlora_data_ratio(n, data_ratio, seed):
    import torch

    torch.manual_seed(seed)
    subset = torch.randperm(n)[: int(data_ratio * n)]
    subset.sort()  # as written in finetune.py: returns a sorted copy, leaves `subset` as it is
    return subset.tolist()


def atlas_split_train_into_train_val(n, val_fraction=0.1, max_val_samples=5000, seed=0):  # registry.py
    import torch
    from torch.utils.data import random_split

    val_size = min(int(n * val_fraction), max_val_samples)
    trainset, valset = random_split(
        range(n), [n - val_size, val_size], generator=torch.Generator().manual_seed(seed)
    )
    return list(valset.indices)


def atlas_caltech_split(n, train_fraction=0.8, seed=0):  # caltech.py
    import torch
    from torch.utils.data import random_split

    train_size = int(n * train_fraction)
    train, test = random_split(
        range(n), [train_size, n - train_size], generator=torch.Generator().manual_seed(seed)
    )
    return list(train.indices), list(test.indices)
