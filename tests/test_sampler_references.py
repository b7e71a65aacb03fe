"""`sampler=coop` and `sampler=clip_lora` draw exactly the images CoOp and CLIP-LoRA draw.

The references' algorithms are transcribed in tests/reference_samplers.py from their published
code; they seed and draw from Python's *global* `random`, as the references do. kr_vlm draws from its own
`random.Random(seed)`; the lists being equal, image for image and in order, for every dataset,
seed and shot count is the proof that the two streams are the same.

The folders are written in CoOp's layout with split files that list their entries shuffled (as
CoOp's real ones do, so classes first appear out of label order), classes with fewer training and
validation images than K, and classes with more.
"""

from __future__ import annotations

import math
import os
import random

import pytest

from coop_layout import make_coop_dataset
from kr_vlm.data.datamodules import FewShotDataModule
from kr_vlm.data.registry import DATASET_NAMES
from reference_samplers import Datum, clip_lora_draw, coop_draw, read_train_val

# The folders have short classes on purpose; the samplers' warnings about them are expected.
pytestmark = pytest.mark.filterwarnings("ignore:.*classes have fewer than:UserWarning")

# The 11 few-shot benchmarks of CoOp / CLIP-LoRA.
FEWSHOT_DATASETS = DATASET_NAMES[:11]
SEEDS = (1, 2, 3)
SHOTS = (1, 2, 4, 16)
# Per class: short classes (fewer than 4 or 16), and classes with more than every K or 4.
COUNTS = {"train": [6, 2, 9, 21], "val": [5, 1, 3, 7], "test": [2, 1, 2, 1]}
# CLIP-LoRA's ImageNet reader draws K + min(K, 4) different images of every class.
IMAGENET_FULL = {"train": [21, 24, 20, 23], "test": [2, 1, 2, 1]}

# ---- kr_vlm ----------------------------------------------------------------------------------


def as_samples(items):
    return [(item.impath, item.label) if isinstance(item, Datum) else tuple(item) for item in items]


def drawn(root, name, sampler, shots, seed, subsample="all"):
    dm = FewShotDataModule(
        name, root=root, shots=shots, seed=seed, sampler=sampler, num_workers=0, subsample=subsample
    )
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def coop_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coop_data")
    for index, name in enumerate(FEWSHOT_DATASETS):
        counts = IMAGENET_FULL if name == "imagenet" else COUNTS
        make_coop_dataset(root, name, classes=4, per_class=counts, shuffle_seed=index)
    return root


@pytest.fixture
def shuffled_listdir(monkeypatch):
    """`os.listdir` of ImageNet's class folders in a scrambled, fixed order, as many file systems give."""
    real = os.listdir

    def scrambled(path="."):
        names = real(path)
        if f"{os.sep}images{os.sep}train{os.sep}" in os.fspath(path) + os.sep:
            random.Random(os.fspath(path)).shuffle(names)
        return names

    monkeypatch.setattr(os, "listdir", scrambled)


@pytest.mark.parametrize("name", FEWSHOT_DATASETS)
@pytest.mark.parametrize(("sampler", "reference_draw"), [("coop", coop_draw), ("clip_lora", clip_lora_draw)])
def test_sampler_draws_what_the_reference_draws(coop_root, shuffled_listdir, name, sampler, reference_draw):
    for seed in SEEDS:
        for shots in SHOTS:
            dm = drawn(coop_root, name, sampler, shots, seed)
            train, val = reference_draw(coop_root, name, shots, seed)
            assert dm.train_dataset.samples == as_samples(train), (name, seed, shots)
            assert dm.val_datasets[0].samples == as_samples(val), (name, seed, shots)


def test_the_reference_folders_exercise_short_classes_and_shuffled_split_files(coop_root):
    # The fixture is only a proof if it has what makes the samplers differ.
    train, val = read_train_val(coop_root, "dtd")
    first_seen = list(dict.fromkeys(item.label for item in train))
    assert first_seen != sorted(first_seen)
    assert min(COUNTS["train"]) < 4 < max(COUNTS["train"]) and min(COUNTS["val"]) < 4 < max(COUNTS["val"])
    coop_train = drawn(coop_root, "dtd", "coop", 4, 1).train_dataset.samples
    clip_lora_train = drawn(coop_root, "dtd", "clip_lora", 4, 1).train_dataset.samples
    kr_vlm_train = drawn(coop_root, "dtd", "kr_vlm", 4, 1).train_dataset.samples
    assert len({tuple(coop_train), tuple(clip_lora_train), tuple(kr_vlm_train)}) == 3
    assert len(coop_train) == sum(min(4, n) for n in COUNTS["train"])  # repeat=False
    assert len(clip_lora_train) == 4 * len(COUNTS["train"])  # repeat=True


def test_coop_imagenet_follows_os_listdir_and_validates_on_test(tmp_path, shuffled_listdir):
    make_coop_dataset(tmp_path, "imagenet", classes=4, per_class={"train": COUNTS["train"], "test": [2] * 4})
    for seed in SEEDS:
        for shots in SHOTS:
            dm = drawn(tmp_path, "imagenet", "coop", shots, seed)
            train, test = coop_draw(tmp_path, "imagenet", shots, seed)
            assert dm.train_dataset.samples == as_samples(train)
            assert dm.val_datasets[0].samples == dm.test_datasets[0].samples
            assert sorted(dm.test_datasets[0].samples) == sorted(as_samples(test))


def test_base_to_new_subsamples_after_the_draw(coop_root):
    # CoCoOp: the shots are drawn on all classes, then subsample_classes keeps a half and relabels it.
    for subsample in ("base", "new"):
        dm = drawn(coop_root, "oxford_pets", "coop", 4, 2, subsample=subsample)
        train, val = coop_draw(coop_root, "oxford_pets", 4, 2)
        labels = sorted({item.label for item in train})
        m = math.ceil(len(labels) / 2)
        selected = labels[:m] if subsample == "base" else labels[m:]
        relabeler = {y: y_new for y_new, y in enumerate(selected)}
        expected = [(item.impath, relabeler[item.label]) for item in train if item.label in selected]
        assert dm.train_dataset.samples == expected


def test_samplers_leave_the_global_random_state_alone(coop_root):
    random.seed(1234)
    expected = random.random()
    random.seed(1234)
    for sampler in ("coop", "clip_lora", "kr_vlm"):
        drawn(coop_root, "imagenet", sampler, 2, 1)
        drawn(coop_root, "eurosat", sampler, 2, 1)
    assert random.random() == expected
