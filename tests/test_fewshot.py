"""Few-shot sampling (kr_vlm.data.fewshot): determinism, counts, replacement, cache, base-to-new."""

from __future__ import annotations

import json
import logging
import random
import warnings

import pytest

from coop_layout import read_only
from kr_vlm.data import fewshot
from kr_vlm.data.fewshot import (
    DEFAULT_CACHE_FOLDER,
    SAMPLERS,
    FewShotSplit,
    base_new_labels,
    cache_path,
    few_shot_split,
    resolve_cache_dir,
    sample_per_class,
    source_hash,
    subsample_classes,
    user_cache_dir,
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


def test_val_shots_has_its_own_cache_file_and_the_default_keeps_its_name(tmp_path):
    default = few_shot_split("toy", TRAIN, VAL, shots=2, seed=1, cache_dir=tmp_path)
    larger = few_shot_split("toy", TRAIN, VAL, shots=2, seed=1, cache_dir=tmp_path, val_shots=6)
    digest = source_hash(TRAIN, VAL)
    assert cache_path(tmp_path, "toy", 2, 1, digest).is_file()
    assert cache_path(tmp_path, "toy", 2, 1, digest, val_shots=6).name.startswith("shot_2-seed_1-kr_vlm-val_6-")
    assert cache_path(tmp_path, "toy", 2, 1, digest, val_shots=2) == cache_path(tmp_path, "toy", 2, 1, digest)
    # Read back, each is its own split.
    assert few_shot_split("toy", TRAIN, VAL, shots=2, seed=1, cache_dir=tmp_path) == default
    assert few_shot_split("toy", TRAIN, VAL, shots=2, seed=1, cache_dir=tmp_path, val_shots=6) == larger
    assert len(larger.val) == 30 and len(list((tmp_path / "toy").glob("*.json"))) == 2


def test_no_warning_when_every_class_has_enough():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        few_shot_split("toy", TRAIN, VAL, shots=4, seed=1)


def test_cache_is_written_and_reused(tmp_path, monkeypatch):
    split = few_shot_split("toy", TRAIN, VAL, shots=4, seed=1, cache_dir=tmp_path)
    path = cache_path(tmp_path, "toy", 4, 1, source_hash(TRAIN, VAL))
    record = json.loads(path.read_text())
    assert record["dataset"] == "toy" and record["shots"] == 4 and record["seed"] == 1
    assert [tuple(item) for item in record["train"]] == split.train

    def no_sampling(*args, **kwargs):
        raise AssertionError("the cached split should have been read")

    monkeypatch.setattr(fewshot, "sample_per_class", no_sampling)
    shuffled = TRAIN[::-1]  # same files, another order: same cache entry
    assert few_shot_split("toy", shuffled, VAL, shots=4, seed=1, cache_dir=tmp_path) == split


def test_cache_is_invalidated_when_the_file_list_changes(tmp_path):
    few_shot_split("toy", TRAIN, VAL, shots=4, seed=1, cache_dir=tmp_path)
    changed = TRAIN[1:] + [("/data/set/class_0/new.jpg", 0)]
    split = few_shot_split("toy", changed, VAL, shots=4, seed=1, cache_dir=tmp_path)
    assert set(split.train) <= set(changed)
    assert len(list((tmp_path / "toy").glob("*.json"))) == 2
    relabelled = [(path, 1 - label if label < 2 else label) for path, label in TRAIN]
    assert source_hash(relabelled, VAL) != source_hash(TRAIN, VAL)


def test_cache_keys_shots_and_seed(tmp_path):
    for shots, seed in [(1, 1), (2, 1), (1, 2)]:
        few_shot_split("toy", TRAIN, VAL, shots=shots, seed=seed, cache_dir=tmp_path)
    assert len(list((tmp_path / "toy").glob("*.json"))) == 3


def test_unreadable_cache_is_resampled(tmp_path):
    expected = few_shot_split("toy", TRAIN, VAL, shots=2, seed=1)
    path = cache_path(tmp_path, "toy", 2, 1, source_hash(TRAIN, VAL))
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable few-shot cache"):
        assert few_shot_split("toy", TRAIN, VAL, shots=2, seed=1, cache_dir=tmp_path) == expected
    assert json.loads(path.read_text())["shots"] == 2  # rewritten


def test_source_hash_ignores_order_but_not_content():
    assert source_hash(TRAIN, VAL) == source_hash(TRAIN[::-1], VAL[::-1])
    assert source_hash(TRAIN, VAL) != source_hash(TRAIN[:-1], VAL)
    assert source_hash(TRAIN, VAL) != source_hash(TRAIN + VAL, [])


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


def test_samplers_have_their_own_cache_files(tmp_path):
    for sampler in SAMPLERS:
        few_shot_split("toy", TRAIN, VAL, shots=2, seed=1, cache_dir=tmp_path, sampler=sampler)
    names = sorted(path.name for path in (tmp_path / "toy").glob("*.json"))
    assert [name.split("-")[2] for name in names] == sorted(SAMPLERS)


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
def test_a_cache_that_does_not_fit_the_dataset_is_drawn_again(tmp_path, edit):
    expected = few_shot_split("toy", TRAIN, VAL, shots=2, seed=1, cache_dir=tmp_path)
    path = cache_path(tmp_path, "toy", 2, 1, source_hash(TRAIN, VAL))
    record = json.loads(path.read_text())
    _edit(record, edit)
    path.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="does not fit the dataset"):
        assert few_shot_split("toy", TRAIN, VAL, shots=2, seed=1, cache_dir=tmp_path) == expected
    assert json.loads(path.read_text())["train"] == [list(item) for item in expected.train]  # rewritten


def test_a_read_only_data_root_caches_in_the_user_cache_folder(tmp_path, monkeypatch, caplog):
    root = tmp_path / "shared_data"
    root.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = root / DEFAULT_CACHE_FOLDER
    with read_only(root, monkeypatch), caplog.at_level(logging.WARNING, logger="kr_vlm.data.fewshot"):
        first = resolve_cache_dir(default, root)
        again = resolve_cache_dir(default, root)
        with pytest.raises(ConfigError, match=r"paths\.cache_dir"):  # not the default: no fallback
            resolve_cache_dir(root / "my_cache", root)
    assert first == again == tmp_path / "xdg" / "kr_vlm"
    assert len(caplog.records) == 1 and "not writable" in caplog.records[0].getMessage()  # said once
    assert list(root.iterdir()) == []


def test_the_user_cache_folder_defaults_to_home(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert user_cache_dir() == tmp_path / ".cache" / "kr_vlm"


def test_an_explicit_cache_folder_that_cannot_be_written_is_a_config_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=r"paths\.cache_dir"):
        resolve_cache_dir(tmp_path / "a_file" / "cache", tmp_path)
    assert resolve_cache_dir(None, tmp_path) is None
    assert resolve_cache_dir(tmp_path / "mine", tmp_path) == tmp_path / "mine"
