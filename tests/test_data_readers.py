"""Dataset readers in CoOp's layout, ImageListDataset, templates and scripts/check_data.py."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import types
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from benchmark_helpers import HAVE_CLIP_BENCHMARK
from coop_layout import make_coop_dataset, write_image
from kr_vlm.atlas_names import ATLAS22
from kr_vlm.data.base import (
    ClassificationTask,
    CorruptImageError,
    DatasetNotFoundError,
    ImageListDataset,
    MalformedDatasetError,
)
from kr_vlm.data.registry import DATASET_NAMES, DATASETS, build_dataset
from kr_vlm.data.templates import CLIP_IMAGENET_TEMPLATES, TEMPLATE_KINDS, get_templates

# digits and glyphs are drawn by kr_vlm; aTLAS's 22 have tests of their own (test_atlas_readers.py); every
# other dataset is read from a CoOp folder.
COOP_NAMES = [name for name in DATASET_NAMES if name not in ("digits", "glyphs", *ATLAS22)]
PER_CLASS = {"train": 3, "val": 1, "test": 2}


def _green_of(label: int) -> int:
    # coop_layout.write_image encodes the label in the green channel (80 + 57 * label).
    return (label * 57 + 80) % 256


def test_dataset_names_are_the_documented_ones():
    """data/README.md's tables (CoOp's datasets, then aTLAS's 22) and the two kr_vlm draws itself name
    exactly the datasets the registry builds."""
    text = (Path(__file__).resolve().parents[1] / "data" / "README.md").read_text()
    tables = [table for table in text.split("\n\n") if table.startswith("| name (`data=...`) |")]
    documented = [row.split("`")[1] for table in tables for row in table.splitlines()[2:]]
    drawn = text[text.index("The only datasets that need nothing on disk") :].split("\n\n")[0]
    documented += [name for name in ("digits", "glyphs") if f"`{name}`" in drawn]
    assert len(tables) == 2 and sorted(documented) == sorted(DATASET_NAMES)


@pytest.mark.parametrize("name", COOP_NAMES)
def test_reader_counts_labels_and_classnames(tmp_path, name):
    fake = make_coop_dataset(tmp_path, name, classes=3, per_class=PER_CLASS)
    for split in DATASETS[name].splits:
        dataset = build_dataset(name, tmp_path, split)
        assert isinstance(dataset, ImageListDataset)
        assert dataset.name == f"{name}/{split}"
        assert len(dataset) == fake.counts[split]
        assert dataset.classnames == fake.classnames
        assert sorted(set(dataset.labels)) == [0, 1, 2]
        for index, (path, label) in enumerate(dataset.samples):
            assert Path(path).is_absolute()
            image, item_label = dataset[index]
            assert item_label == label
            assert image.mode == "RGB" and image.size == (8, 8)
            # The pixel colour was written from the label: the reader's label belongs to the image.
            assert abs(image.getpixel((4, 4))[1] - _green_of(label)) < 12, path


def test_listing_is_sorted_and_deterministic(tmp_path):
    make_coop_dataset(tmp_path, "imagenet", classes=3, per_class=4)
    first = build_dataset("imagenet", tmp_path, "train").samples
    assert first == build_dataset("imagenet", tmp_path, "train").samples
    assert [path for path, _ in first] == sorted(path for path, _ in first)


def test_imagenet_val_is_its_test_set_and_labels_follow_sorted_train_folders(tmp_path):
    fake = make_coop_dataset(tmp_path, "imagenet", classes=3, per_class=2)
    val, test = build_dataset("imagenet", tmp_path, "val"), build_dataset("imagenet", tmp_path, "test")
    assert val.samples == test.samples
    assert all("/images/val/" in path for path, _ in test.samples)
    wnids = sorted(p.name for p in (fake.path / "images" / "train").iterdir())
    for path, label in test.samples:
        assert Path(path).parent.name == wnids[label]


def test_imagenet_val_folder_unknown_to_train_is_an_error(tmp_path):
    fake = make_coop_dataset(tmp_path, "imagenet", classes=3, per_class=1)
    write_image(fake.path / "images" / "val" / "n99999999" / "x.JPEG", 0)
    with pytest.raises(MalformedDatasetError, match="n99999999"):
        build_dataset("imagenet", tmp_path, "test")


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_r"])
def test_imagenet_a_r_label_is_index_in_their_own_sorted_folders(tmp_path, name):
    fake = make_coop_dataset(tmp_path, name, classes=3, per_class=2)
    image_dir = fake.path / DATASETS[name].reader.keywords["image_dir"]
    assert (image_dir / "README.txt").is_file()
    classnames_txt = [line.split(" ", 1) for line in (fake.path / "classnames.txt").read_text().splitlines()]
    dataset = build_dataset(name, tmp_path, "test")
    folders = sorted(p.name for p in image_dir.iterdir() if p.is_dir())
    assert len(folders) == 3 and len(classnames_txt) == 6  # a subset of the wnids, as 200 of 1000
    for path, label in dataset.samples:
        assert Path(path).parent.name == folders[label]
    # Names belong to the folders (every second wnid), not to ImageNet's first entries.
    assert dataset.classnames == [name for wnid, name in classnames_txt if wnid in folders]
    assert dataset.classnames == fake.classnames


def test_imagenet_v2_label_is_folder_number(tmp_path):
    fake = make_coop_dataset(tmp_path, "imagenet_v2", classes=3, per_class=1)
    dataset = build_dataset("imagenet_v2", tmp_path, "test")
    assert all(int(Path(path).parent.name) == label for path, label in dataset.samples)
    (fake.path / "imagenetv2-matched-frequency-format-val" / "7").mkdir()
    with pytest.raises(MalformedDatasetError, match="0..2"):
        build_dataset("imagenet_v2", tmp_path, "test")


def test_underscores_become_spaces_in_classnames(tmp_path):
    make_coop_dataset(tmp_path, "oxford_pets", classes=2, per_class=1)
    assert build_dataset("oxford_pets", tmp_path, "train").classnames == ["red fox", "blue whale"]


@pytest.mark.parametrize("name", ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_shift_sets_have_only_test(tmp_path, name, split):
    with pytest.raises(ValueError, match=r"\['test'\]"):
        build_dataset(name, tmp_path, split)


def test_unknown_dataset_lists_known_ones(tmp_path):
    with pytest.raises(ValueError, match="Known datasets: imagenet, caltech101.*digits.*cifar10"):
        build_dataset("cifar11", tmp_path, "train")


def test_unknown_split_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no split 'trainval'"):
        build_dataset("dtd", tmp_path, "trainval")


def test_missing_root_names_the_path(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match="paths.data_dir") as info:
        build_dataset("dtd", root, "train")
    assert str(root) in str(info.value) and "data/README.md" in str(info.value)


def test_missing_dataset_folder_names_path_and_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset("caltech101", tmp_path, "train")
    message = str(info.value)
    assert str(tmp_path / "caltech-101") in message
    assert "101_ObjectCategories" in message and "split_zhou_Caltech101.json" in message


def test_missing_split_file_names_it(tmp_path):
    fake = make_coop_dataset(tmp_path, "eurosat", classes=2, per_class=1)
    (fake.path / "split_zhou_EuroSAT.json").unlink()
    with pytest.raises(DatasetNotFoundError, match="split_zhou_EuroSAT.json"):
        build_dataset("eurosat", tmp_path, "test")


def test_missing_fgvc_split_file_names_it(tmp_path):
    fake = make_coop_dataset(tmp_path, "fgvc_aircraft", classes=2, per_class=1)
    (fake.path / "images_variant_val.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="images_variant_val.txt"):
        build_dataset("fgvc_aircraft", tmp_path, "val")


def test_fgvc_variant_names_keep_spaces(tmp_path):
    make_coop_dataset(tmp_path, "fgvc_aircraft", classes=2, per_class=1)
    assert build_dataset("fgvc_aircraft", tmp_path, "test").classnames == [
        "Jet-000 red fox",
        "Jet-100 blue whale",
    ]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda table: table["test"][0].__setitem__(2, "other"), "called both"),
        (lambda table: [entry.__setitem__(1, 5) for entry in table["val"] if entry[1] == 1], "without gaps"),
        (lambda table: table.pop("val"), "keys"),
    ],
)
def test_inconsistent_split_file_is_malformed(tmp_path, edit, match):
    fake = make_coop_dataset(tmp_path, "dtd", classes=2, per_class=1)
    split_path = fake.path / "split_zhou_DescribableTextures.json"
    table = json.loads(split_path.read_text())
    edit(table)
    split_path.write_text(json.dumps(table))
    with pytest.raises(MalformedDatasetError, match=match):
        build_dataset("dtd", tmp_path, "train")


def test_build_dataset_passes_transform_and_rejects_unknown_options(tmp_path):
    make_coop_dataset(tmp_path, "food101", classes=2, per_class=1)
    dataset = build_dataset("food101", tmp_path, "train", transform=lambda image: image.size)
    assert dataset[0] == ((8, 8), 0)
    dataset.transform = None
    assert isinstance(dataset[0][0], Image.Image)
    with pytest.raises(TypeError, match="shots"):
        build_dataset("food101", tmp_path, "train", shots=4)


def test_digits_dispatches_to_the_digits_module(tmp_path, monkeypatch):
    calls = []
    fake_module = types.ModuleType("kr_vlm.data.digits")
    fake_module.build_digits = lambda root, split, **kwargs: calls.append((root, split, kwargs)) or "digits"
    monkeypatch.setitem(sys.modules, "kr_vlm.data.digits", fake_module)
    assert build_dataset("digits", tmp_path, "val", domain="svhn") == "digits"
    assert calls == [(tmp_path, "val", {"domain": "svhn"})]


def _dataset_with_truncated_image(
    tmp_path: Path, suffix: str = "jpg", **kwargs
) -> tuple[ImageListDataset, str]:
    paths = [tmp_path / f"{i}.{suffix}" for i in range(3)]
    for path in paths:
        Image.effect_noise((64, 64), 60).convert("RGB").save(path)  # noise: no tiny, fully-read file
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])
    samples = [(str(path), label) for label, path in enumerate(paths)]
    return ImageListDataset(samples, ["a", "b", "c"], name="tiny", **kwargs), str(paths[1])


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_truncated_image_raises_naming_the_file(tmp_path, suffix):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    dataset, bad_path = _dataset_with_truncated_image(tmp_path, suffix)
    assert dataset[0][1] == 0
    with pytest.raises(CorruptImageError, match="skip_corrupt") as info:
        dataset[1]
    assert bad_path in str(info.value)


def test_padding_truncated_images_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    dataset, _ = _dataset_with_truncated_image(tmp_path)
    with pytest.warns(RuntimeWarning, match="LOAD_TRUNCATED_IMAGES"):
        dataset[0]


def test_skip_corrupt_skips_counts_and_logs(tmp_path, caplog):
    dataset, bad_path = _dataset_with_truncated_image(tmp_path, skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="kr_vlm.data.base"):
        assert dataset[1][1] == 2  # falls through to the next readable sample
        assert dataset[1][1] == 2
    assert dataset.corrupt_count == 1
    assert bad_path in caplog.text
    assert [dataset[i][1] for i in range(len(dataset))] == [0, 2, 2]


def test_skip_corrupt_with_nothing_readable_raises(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(CorruptImageError, match="none of its 1 images"):
        ImageListDataset([(str(path), 0)], ["a"], skip_corrupt=True)[0]


def test_image_list_dataset_rejects_labels_outside_classnames():
    with pytest.raises(ValueError, match="outside 0..1"):
        ImageListDataset([("x.jpg", 2)], ["a", "b"])


def test_classification_task_is_frozen_and_validated():
    task = ClassificationTask("dtd", ["banded", "woven"], ["{} texture."])
    assert task.classnames == ("banded", "woven") and len(task.classnames) == 2
    assert hash(task) == hash(ClassificationTask("dtd", ("banded", "woven"), ("{} texture.",)))
    with pytest.raises(AttributeError):
        task.name = "other"
    with pytest.raises(ValueError, match="exactly one"):
        ClassificationTask("dtd", ["banded"], ["a texture."])


def test_templates():
    assert get_templates("oxford_pets", "coop") == ("a photo of a {}, a type of pet.",)
    assert get_templates("dtd", "coop") == ("{} texture.",)
    assert get_templates("eurosat", "simple") == ("a photo of a {}.",)
    assert get_templates("ucf101", "clip80") == CLIP_IMAGENET_TEMPLATES
    assert get_templates("dtd", "an_image_of") == ("An image of {}",)  # the KRAdapter authors' caption
    assert len(CLIP_IMAGENET_TEMPLATES) == 80 and CLIP_IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    kinds = [kind for kind in TEMPLATE_KINDS if kind != "clip_benchmark" or HAVE_CLIP_BENCHMARK]
    for name in DATASET_NAMES:
        for kind in kinds:
            ClassificationTask(name, ["x"], get_templates(name, kind))  # one "{}" each
    with pytest.raises(ValueError, match="simple, coop, coop_ensemble, clip80, an_image_of"):
        get_templates("dtd", "fancy")


def _load_check_data():
    path = Path(__file__).resolve().parents[1] / "scripts" / "check_data.py"
    spec = importlib.util.spec_from_file_location("check_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_data_reports_found_missing_and_malformed(tmp_path, capsys):
    check_data = _load_check_data()
    make_coop_dataset(tmp_path, "dtd", classes=2, per_class=1)
    make_coop_dataset(tmp_path, "imagenet_a", classes=2, per_class=1)
    assert check_data.main([str(tmp_path), "--datasets", "dtd", "imagenet_a", "eurosat"]) == 0
    out = capsys.readouterr().out
    assert "found" in out and "missing" in out and "malformed" not in out

    broken = make_coop_dataset(tmp_path, "ucf101", classes=2, per_class=1)
    next((broken.path / "UCF-101-midframes").rglob("*.jpg")).unlink()
    assert check_data.main([str(tmp_path), "--datasets", "dtd", "ucf101"]) == 1
    lines = capsys.readouterr().out.splitlines()
    # Piped (not a terminal): a Markdown table, each dataset on one line with its note and paths whole.
    assert lines[2] == "| dataset | folder | status | classes | train | val | test | note |"
    (ucf101,) = (line for line in lines if line.startswith("| ucf101 |"))
    assert "| malformed |" in ucf101 and f"e.g. {broken.path}/UCF-101-midframes/" in ucf101
    assert check_data.main([str(tmp_path / "nowhere")]) == 1
