"""The 22 datasets of aTLAS (fredzzhang/atlas), on which the KRAdapter authors train CLIP (PaulAlbert31/RandLoRA,
`vision_language/`): their names, class names, templates, splits and draws.

- `ATLAS22`: kr_vlm's names of the 22, in the order of aTLAS's DATASETS.md; `ATLAS_NAMES` maps each to
  aTLAS's own name (the key of its templates and of its published accuracies).
- `atlas_templates(name)`: aTLAS's prompt templates (`src/datasets/templates.py`), and
  `atlas_classnames(name)`: the class names aTLAS writes out in its code (GTSRB, Flowers102, Country211,
  RESISC45, PascalVOC); both shipped in `atlas_metadata.json` with their source.
- aTLAS evaluates on each dataset's test split and selects on `<Name>Val`: the dataset's own
  validation split where it has one, else `atlas_val_indices` of its training split (10 %, at most 5000
  images, `torch.utils.data.random_split` with seed 0, as aTLAS's `split_train_into_train_val`).
- Caltech101 and Caltech256 have no split: aTLAS takes `caltech_split_indices`, 80 % / 20 % of the whole
  set with `random_split` seeded 0.
- The draws of RandLoRA's `finetune.py` and aTLAS's `learn_few_shots.py`: `atlas_shots` (per class, the
  last K of a `torch.randperm` of its images: `get_n_shots`) and `atlas_fraction` (the first `int(f·n)`
  of a `torch.randperm` of the whole training split). Both draw from a `torch.Generator` seeded with the
  run seed. The authors draw from torch's global generator at whatever state building their model left
  it in, so these are their draws in kind, not image for image.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

import torch

from kr_vlm.atlas_names import ATLAS22, ATLAS_NAMES

__all__ = ["ATLAS22", "ATLAS_NAMES"]

Samples = list[tuple[str, int]]

METADATA_FILE = "atlas_metadata.json"

# Epochs of RandLoRA's data-ratio runs (`--data-ratio 0.5` / `1.0`), per dataset, from the `epochs` table of its
# vision_language/src/finetune.py ("Same training epochs as in aTLAS"); few-shot runs train 10 epochs everywhere.
FRACTION_EPOCHS: dict[str, int] = {
    "stanford_cars_atlas": 35, "dtd_atlas": 76, "eurosat_atlas": 13, "gtsrb": 11, "mnist": 5, "resisc45": 15,
    "sun397_atlas": 14, "svhn": 4, "cifar10": 5, "cifar100": 6, "stl10": 4, "food101_atlas": 15,
    "caltech256": 8, "fgvc_aircraft_atlas": 60, "oxford_flowers_atlas": 40, "oxford_pets_atlas": 5, "cub200": 20,
    "pascal_voc": 10, "country211": 15, "caltech101_atlas": 10, "ucf101_atlas": 20, "imagenet_atlas": 10,
}  # fmt: skip
FEW_SHOT_EPOCHS = 10

# aTLAS's `split_train_into_train_val(..., val_fraction=0.1, max_val_samples=5000, seed=0)`.
VAL_FRACTION = 0.1
MAX_VAL_IMAGES = 5000
SPLIT_SEED = 0
# Caltech101 / Caltech256: `train_fraction=0.8`, `random_split(..., generator=Generator().manual_seed(0))`.
CALTECH_TRAIN_FRACTION = 0.8


@lru_cache(maxsize=1)
def metadata() -> dict[str, Any]:
    """The shipped `atlas_metadata.json`: templates, written-out class names, EuroSAT's name map."""
    return json.loads(resources.files("kr_vlm.data").joinpath(METADATA_FILE).read_text(encoding="utf-8"))


def atlas_templates(atlas_name: str) -> tuple[str, ...]:
    """aTLAS's templates for its dataset `atlas_name` (e.g. ``"DTD"``), each with one ``{}``."""
    return tuple(metadata()["templates"][atlas_name])


def atlas_classnames(atlas_name: str) -> list[str]:
    """The class names aTLAS writes out for `atlas_name` (index = label)."""
    return list(metadata()["classnames"][atlas_name])


def _random_split_parts(n: int, first: int, seed: int) -> tuple[list[int], list[int]]:
    """`torch.utils.data.random_split(range(n), [first, n - first], Generator().manual_seed(seed))` as index
    lists (random_split takes one `randperm` of all indices and cuts it)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[:first], order[first:]


def atlas_val_indices(n: int) -> list[int]:
    """The indices of aTLAS's validation images among `n` training images (`<Name>Val`'s test set)."""
    size = min(int(n * VAL_FRACTION), MAX_VAL_IMAGES)
    return _random_split_parts(n, n - size, SPLIT_SEED)[1]


def caltech_split_indices(n: int, split: str) -> list[int]:
    """aTLAS's train or test images (indices into torchvision's Caltech list) of a Caltech set of `n` images."""
    train, test = _random_split_parts(n, int(n * CALTECH_TRAIN_FRACTION), SPLIT_SEED)
    return train if split == "train" else test


def _grouped(samples: Sequence[tuple[str, int]]) -> dict[int, Samples]:
    groups: dict[int, Samples] = defaultdict(list)
    for path, label in samples:
        groups[int(label)].append((str(path), int(label)))
    return groups


def atlas_shots(
    train: Sequence[tuple[str, int]], shots: int, val_shots: int, generator: torch.Generator, with_val: bool
) -> tuple[Samples, Samples]:
    """`get_n_shots`: for each label in increasing order, a `torch.randperm` of its images (in list order),
    the last `shots` of it (all of them where a class has fewer). With `with_val`, the `val_shots` before
    those are the validation shots (aTLAS draws none: kr_vlm's choice, disjoint from the training shots)."""
    train_shots: Samples = []
    validation: Samples = []
    groups = _grouped(train)
    for label in sorted(groups):
        items = groups[label]
        order = torch.randperm(len(items), generator=generator).tolist()
        kept = order[-shots:]
        train_shots.extend(items[i] for i in kept)
        if with_val:
            rest = order[: len(order) - len(kept)]
            validation.extend(items[i] for i in rest[len(rest) - min(val_shots, len(rest)) :])
    return train_shots, validation


def atlas_fraction(samples: Sequence[tuple[str, int]], fraction: float, seed: int) -> Samples:
    """The first `int(fraction · n)` of a `torch.randperm(n)` seeded with `seed`, in increasing index order
    (RandLoRA's `--data-ratio <float>`: `randperm(n)[:int(ratio * n)]`, sorted)."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
    kept = sorted(order[: int(fraction * len(samples))].tolist())
    return [(str(samples[i][0]), int(samples[i][1])) for i in kept]
