"""Few-shot sampling (kr_vlm.data.fewshot): determinism, counts, replacement, base-to-new."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from kr_vlm.data.fewshot import (
    SAMPLERS,
    FewShotSplit,
    base_new_labels,
    few_shot_split,
    sample_per_class,
    split_misfit,
    subsample_classes,
    validation_shots,
)
from kr_vlm.errors import ConfigError


def make_samples(per_class: dict[int, int], prefix: str = "/data/set") -> list[tuple[str, int]]:
    """`(path, label)` pairs with `per_class[label]` images per class, listed class by class."""
    return [
        (f"{prefix}/class_{label}/img_{i:03d}.jpg", label)
        for label, count in per_class.items()
        for i in range(count)
    ]


TRAIN = make_samples(dict.fromkeys(range(5), 20))
VAL = make_samples(dict.fromkeys(range(5), 6), prefix="/data/set/val")


def counts(samples: list[tuple[str, int]]) -> dict[int, int]:
    result: dict[int, int] = {}
    for _, label in samples:
        result[label] = result.get(label, 0) + 1
    return result


def test_same_seed_same_split_and_other_seed_other_split():
    first = few_shot_split("toy", TRAIN, VAL, shots=4, seed=1)
    again = few_shot_split("toy", TRAIN, VAL, shots=4, seed=1)
    other = few_shot_split("toy", TRAIN, VAL, shots=4, seed=2)
    assert first == again
    assert first.train != other.train


def test_split_does_not_depend_on_listing_order():
    shuffled_train, shuffled_val = TRAIN[:], VAL[:]
    random.Random(123).shuffle(shuffled_train)
    random.Random(321).shuffle(shuffled_val)
    assert few_shot_split("toy", shuffled_train, shuffled_val, 4, 1) == few_shot_split(
        "toy", TRAIN, VAL, 4, 1
    )


def test_split_leaves_global_random_state_alone():
    random.seed(99)
    expected = random.random()
    random.seed(99)
    few_shot_split("toy", TRAIN, VAL, 4, 1)
    assert random.random() == expected


def test_split_is_pinned():
    # The exact draw for one small input: a change of algorithm (or of Python's random) shows up here.
    train = make_samples({0: 5, 1: 5}, prefix="p")
    split = few_shot_split("toy", train, make_samples({0: 2, 1: 2}, prefix="v"), shots=2, seed=1)
    assert split.train == [
        ("p/class_0/img_001.jpg", 0),
        ("p/class_0/img_000.jpg", 0),
        ("p/class_1/img_002.jpg", 1),
        ("p/class_1/img_000.jpg", 1),
    ]
    assert sorted(split.val) == sorted(make_samples({0: 2, 1: 2}, prefix="v"))


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_k_per_class_and_val_min_k_4(shots):
    split = few_shot_split("toy", TRAIN, VAL, shots=shots, seed=3)
    assert counts(split.train) == dict.fromkeys(range(5), shots)
    assert (
        counts(split.val)
        == dict.fromkeys(range(5), min(shots, 4))
        == dict.fromkeys(range(5), validation_shots(shots))
    )
    # Without replacement when a class has enough images, and only images of the source split.
    assert len(set(split.train)) == len(split.train)
    assert set(split.train) <= set(TRAIN) and set(split.val) <= set(VAL)


def test_classes_with_too_few_images_are_sampled_with_replacement_and_named():
    train = make_samples({0: 10, 1: 3, 2: 10, 3: 1})
    with pytest.warns(UserWarning, match="fewer than 8 images") as record:
        split = few_shot_split(
            "toy",
            train,
            make_samples(dict.fromkeys(range(4), 4), prefix="v"),
            shots=8,
            seed=1,
            classnames=["ant", "bee", "cat", "dog"],
        )
    message = str(record[0].message)
    assert "'bee' (3)" in message and "'dog' (1)" in message
    assert "'ant'" not in message and "'cat'" not in message
    assert counts(split.train) == dict.fromkeys(range(4), 8)
    assert len({path for path, label in split.train if label == 1}) == 3


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_val_shots_sets_the_validation_size(sampler):
    split = few_shot_split("toy", TRAIN, VAL, shots=2, seed=3, sampler=sampler, val_shots=5)
    assert counts(split.train) == dict.fromkeys(range(5), 2) and counts(split.val) == dict.fromkeys(range(5), 5)
    assert len(set(split.val)) == len(split.val) and set(split.val) <= set(VAL)
    assert validation_shots(2, 5) == 5 and validation_shots(2) == 2
    # Without a validation split, they come from the training images the shots left (CoOp draws none).
    if sampler != "coop":
        leftover = few_shot_split("toy", TRAIN, None, shots=2, seed=3, sampler=sampler, val_shots=9)
        assert counts(leftover.val) == dict.fromkeys(range(5), 9)
        assert not set(leftover.val) & set(leftover.train) and set(leftover.val) <= set(TRAIN)
    with pytest.raises(ValueError, match="val_shots must be at least 1"):
        few_shot_split("toy", TRAIN, VAL, shots=2, seed=3, sampler=sampler, val_shots=0)


def test_no_warning_when_every_class_has_enough():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        few_shot_split("toy", TRAIN, VAL, shots=4, seed=1)





def test_bad_shots_are_errors():
    with pytest.raises(ValueError, match="at least 1"):
        few_shot_split("toy", TRAIN, VAL, shots=0, seed=1)
    with pytest.raises(ValueError, match="at least 1"):
        sample_per_class(TRAIN, 0, random.Random(0))


def test_base_to_new_halves():
    assert base_new_labels(5, "base") == [0, 1, 2]
    assert base_new_labels(5, "new") == [3, 4]
    assert base_new_labels(4, "base") == [0, 1]
    assert base_new_labels(5, "all") == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="subsample must be one of"):
        base_new_labels(5, "novel")


def test_subsample_relabels_new_classes_from_zero():
    names = ["a", "b", "c", "d", "e"]
    samples = make_samples(dict.fromkeys(range(5), 2))
    new_samples, new_names = subsample_classes(samples, names, "new")
    assert new_names == ["d", "e"]
    assert counts(new_samples) == {0: 2, 1: 2}
    assert all("class_3" in path for path, label in new_samples if label == 0)
    base_samples, base_names = subsample_classes(samples, names, "base")
    assert base_names == ["a", "b", "c"] and counts(base_samples) == {0: 2, 1: 2, 2: 2}
    assert subsample_classes(samples, names, "all") == (samples, names)


def test_split_is_a_value():
    split = few_shot_split("toy", TRAIN, VAL, shots=1, seed=1)
    assert isinstance(split, FewShotSplit)
    assert [label for _, label in split.train] == sorted(label for _, label in split.train)


def test_validation_draw_is_pinned():
    # More validation images per class (9) than are taken (2): a change in how, or from which state of
    # the generator, the validation shots are drawn shows up here.
    train = make_samples({0: 5, 1: 5}, prefix="p")
    split = few_shot_split("toy", train, make_samples({0: 9, 1: 9}, prefix="v"), shots=2, seed=1)
    assert split.val == [
        ("v/class_0/img_007.jpg", 0),
        ("v/class_0/img_008.jpg", 0),
        ("v/class_1/img_007.jpg", 1),
        ("v/class_1/img_006.jpg", 1),
    ]


def test_without_a_validation_split_validation_shots_come_from_the_rest_of_train():
    # ImageNet's val folder is its test set: kr_vlm validates on training images the shots left over.
    train = make_samples({0: 6, 1: 6}, prefix="p")
    split = few_shot_split("toy", train, None, shots=2, seed=1)
    assert split.train == [
        ("p/class_0/img_001.jpg", 0),
        ("p/class_0/img_004.jpg", 0),
        ("p/class_1/img_000.jpg", 1),
        ("p/class_1/img_002.jpg", 1),
    ]
    assert split.val == [
        ("p/class_0/img_000.jpg", 0),
        ("p/class_0/img_002.jpg", 0),
        ("p/class_1/img_005.jpg", 1),
        ("p/class_1/img_003.jpg", 1),
    ]
    short = few_shot_split("toy", make_samples({0: 3, 1: 8}), None, shots=2, seed=4)
    assert counts(short.val) == {0: 1, 1: 2} and not set(short.val) & set(short.train)


def test_unknown_sampler_is_a_config_error():
    with pytest.raises(ConfigError, match="data.sampler must be one of kr_vlm, coop, clip_lora"):
        few_shot_split("toy", TRAIN, VAL, shots=2, seed=1, sampler="dassl")


def _edit(record: dict, edit: str) -> None:
    if edit == "empty train":
        record["train"] = []
    elif edit == "label out of range":
        record["train"][0][1] = 99
    elif edit == "image not in the dataset":
        record["train"][0][0] = "/data/set/class_0/removed.jpg"
    elif edit == "one shot too few":
        record["train"].pop()
    elif edit == "no val":
        record["val"] = None
    elif edit == "val image from train":
        record["val"][0] = record["train"][0]


@pytest.mark.parametrize(
    "edit",
    [
        "empty train",
        "label out of range",
        "image not in the dataset",
        "one shot too few",
        "no val",
        "val image from train",
    ],
)
def test_a_stored_split_that_does_not_fit_the_dataset_is_told_apart(edit):
    """`split_misfit` checks a split read from a file (CoOp's stored splits) against the source lists."""
    expected = few_shot_split("toy", TRAIN, VAL, shots=2, seed=1)
    assert split_misfit(expected, TRAIN, VAL, 2, "kr_vlm") is None
    record = json.loads(json.dumps({"train": expected.train, "val": expected.val}))
    _edit(record, edit)
    edited = FewShotSplit(
        [tuple(item) for item in record["train"]],
        None if record["val"] is None else [tuple(item) for item in record["val"]],
    )
    assert split_misfit(edited, TRAIN, VAL, 2, "kr_vlm") is not None


def test_the_draw_benchmark_runs_side_by_side_with_the_listing():
    script = Path(__file__).parent.parent / "scripts" / "bench_fewshot_draw.py"
    done = subprocess.run(
        [sys.executable, str(script), "--classes", "3", "--per-class", "20", "--shots", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "list 60 training files" in done.stdout
    assert all(f"with {sampler}:" in done.stdout for sampler in SAMPLERS)
