"""aTLAS's 22 datasets: every reader on tiny files in its real format (`atlas_layout`), the labels tied to the
pixels, aTLAS's splits and draws against transcriptions of its code, every sampler and the cache on samples
that are not files, the message of a missing dataset, `data.download`, `check_data.py`, templates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torchvision

from atlas_layout import accept_fabricated_files, label_of, make_atlas_dataset
from benchmark_helpers import needs_clip_benchmark
from kr_vlm.atlas_names import ATLAS22, ATLAS_NAMES
from kr_vlm.data import FewShotDataModule, build_dataset, get_templates
from kr_vlm.data.atlas import atlas_fraction, atlas_shots, atlas_val_indices, caltech_split_indices, metadata
from kr_vlm.data.base import DatasetNotFoundError, MalformedDatasetError
from kr_vlm.data.fewshot import SAMPLERS, few_shot_split
from kr_vlm.data.registry import DATASETS
from kr_vlm.data.templates import COOP_TEMPLATES
from kr_vlm.errors import ConfigError
from reference_samplers import (
    atlas_caltech_split,
    atlas_get_n_shots,
    atlas_split_train_into_train_val,
    randlora_data_ratio,
)

TORCHVISION_DOWNLOADS = {"mnist", "svhn", "cifar10", "cifar100", "stl10", "gtsrb", "food101_atlas",
                         "oxford_flowers_atlas", "oxford_pets_atlas", "country211", "fgvc_aircraft_atlas",
                         "caltech101_atlas", "caltech256"}  # fmt: skip


@pytest.fixture
def fabricated(monkeypatch):
    accept_fabricated_files(monkeypatch)


@pytest.mark.parametrize("name", ATLAS22)
def test_every_split_reads_with_its_labels_in_the_pixels(tmp_path, name, fabricated):
    fake = make_atlas_dataset(tmp_path, name, classes=3, per_class=4)
    for split in ("train", "val", "test"):
        dataset = build_dataset(name, tmp_path, split)
        assert dataset.name == f"{name}/{split}"
        assert len(dataset) == fake.counts[split]
        assert dataset.classnames == fake.classnames
        assert len({path for path, _ in dataset.samples}) == len(dataset)  # every sample its own identity
        assert dataset.missing_files() == []
        for index, (path, label) in enumerate(dataset.samples):
            image, item_label = dataset[index]
            assert image.mode == "RGB" and item_label == label
            assert label_of(image) == label, path  # the pixels were written from this label
    assert build_dataset(name, tmp_path, "train").samples == dataset_again(name, tmp_path)


def dataset_again(name: str, root: Path) -> list:
    return build_dataset(name, root, "train").samples


@pytest.mark.parametrize("name", ATLAS22)
def test_a_missing_dataset_is_one_message_naming_its_folder_and_how_to_get_it(tmp_path, name):
    with pytest.raises(DatasetNotFoundError) as error:
        build_dataset(name, tmp_path, "test")
    message = str(error.value)
    assert str(tmp_path / DATASETS[name].folder) in message and DATASETS[name].layout in message
    if name in TORCHVISION_DOWNLOADS:
        assert "data.download=true" in message and f"torchvision.datasets.{{}}('{tmp_path}" not in message
        assert f"('{tmp_path}" in message  # torchvision's call, with this data root
    elif name not in ("cub200", "pascal_voc"):
        assert "aTLAS's DATASETS.md" in message and "Setup Guide for" in message


def test_validation_images_are_atlas_held_out_share_of_train():
    for n in (9, 57, 100, 60000):  # 60000: MNIST, 10 % capped at 5000
        assert atlas_val_indices(n) == atlas_split_train_into_train_val(n)
    assert len(atlas_val_indices(60000)) == 5000


def test_caltech_splits_are_atlas_80_20_split():
    for n in (9, 1000, 9144):
        train, test = atlas_caltech_split(n)
        assert caltech_split_indices(n, "train") == train and caltech_split_indices(n, "test") == test


def test_val_of_a_dataset_without_its_own_is_held_out_of_train(tmp_path, fabricated):
    make_atlas_dataset(tmp_path, "cifar10", classes=3, per_class=20)
    train = build_dataset("cifar10", tmp_path, "train").samples
    val = build_dataset("cifar10", tmp_path, "val").samples
    assert val == [train[index] for index in atlas_split_train_into_train_val(len(train))] and len(val) == 6


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("shots", [1, 4, 16])
def test_atlas_sampler_draws_as_get_n_shots(seed, shots):
    labels = [index * 7 % 5 for index in range(90)]  # 5 classes, interleaved, 18 images each
    samples = [(f"/data/x#{index:06d}", label) for index, label in enumerate(labels)]
    expected = [samples[index] for index in atlas_get_n_shots(labels, shots, 5, seed)]
    split = few_shot_split("x", samples, None, shots, seed, sampler="atlas")
    assert split.train == expected
    assert not set(split.val) & set(split.train) and len(split.val) == 5 * min(shots, 4, 18 - shots)


def test_atlas_sampler_gives_all_of_a_short_class():
    samples = [("a", 0), ("b", 0), ("c", 1)] + [(f"d{i}", 1) for i in range(5)]
    train, val = atlas_shots(samples, 4, 4, torch.Generator().manual_seed(1), with_val=True)
    assert sorted(train)[:2] == [("a", 0), ("b", 0)] and len(train) == 6 and len(val) == 2


@pytest.mark.parametrize("fraction", [0.5, 1.0, 0.1])
def test_fraction_is_randlora_data_ratio(fraction):
    samples = [(f"/data/x#{index:06d}", index % 3) for index in range(101)]
    expected = sorted(randlora_data_ratio(101, fraction, seed=2))
    assert atlas_fraction(samples, fraction, seed=2) == [samples[index] for index in expected]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_works_on_array_samples_the_same_each_time(tmp_path, sampler, fabricated):
    make_atlas_dataset(tmp_path / "data", "mnist", classes=3, per_class=8)

    def drawn():
        module = FewShotDataModule("mnist", root=tmp_path / "data", shots=2, num_workers=0, sampler=sampler)
        module.setup("fit")
        return module

    first, second = drawn(), drawn()
    assert first.train_dataset.samples == second.train_dataset.samples and len(first.train_dataset) == 6
    assert first.val_datasets[0].samples == second.val_datasets[0].samples
    for dataset in (first.train_dataset, first.val_datasets[0]):
        for index, (_, label) in enumerate(dataset.samples):
            assert label_of(dataset[index][0]) == label
    assert first.train_task.classnames == tuple(str(digit) for digit in range(10))


def test_a_fraction_run_trains_on_that_share_of_the_training_split(tmp_path, fabricated):
    make_atlas_dataset(tmp_path, "gtsrb", classes=3, per_class=10)
    module = FewShotDataModule("gtsrb", root=tmp_path, fraction=0.5, num_workers=0, seed=4)
    module.setup("fit")
    train = build_dataset("gtsrb", tmp_path, "train").samples
    assert module.train_dataset.samples == [train[index] for index in sorted(randlora_data_ratio(30, 0.5, 4))]
    assert module.val_datasets[0].samples == build_dataset("gtsrb", tmp_path, "val").samples
    for fraction, shots in ((0.0, 16), (1.5, 16), ("half", 16), (0.5, 0)):
        with pytest.raises(ConfigError, match="data.fraction"):
            FewShotDataModule("gtsrb", root=tmp_path, fraction=fraction, shots=shots)


def test_download_fetches_with_torchvision_only_when_allowed(tmp_path, monkeypatch):
    calls = []

    def fake_download(self):  # torchvision's MNIST.download, without the network
        calls.append(self.root)
        make_atlas_dataset(self.root, "mnist", classes=3, per_class=2)

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fake_download)
    FewShotDataModule("mnist", root=tmp_path, shots=1).prepare_data()
    assert calls == []
    module = FewShotDataModule("mnist", root=tmp_path, shots=1, num_workers=0, download=True)
    module.prepare_data()
    module.setup("fit")
    assert calls and all(Path(root) == tmp_path for root in calls) and len(module.train_dataset) == 3


def test_torchvision_refusing_the_files_is_a_clear_error(tmp_path):
    make_atlas_dataset(tmp_path, "cifar10", classes=3, per_class=2)  # MD5s are not CIFAR's
    with pytest.raises(DatasetNotFoundError, match="torchvision's CIFAR10 cannot read .*corrupted"):
        build_dataset("cifar10", tmp_path, "test")
    make_atlas_dataset(tmp_path, "food101_atlas", classes=3, per_class=2)
    (tmp_path / "food-101" / "meta" / "test.json").unlink()
    with pytest.raises(MalformedDatasetError, match="torchvision's Food101 cannot read .*test.json"):
        build_dataset("food101_atlas", tmp_path, "test")


def test_check_data_lists_atlas_datasets(tmp_path, capsys, fabricated):
    path = Path(__file__).resolve().parents[1] / "scripts" / "check_data.py"
    spec = importlib.util.spec_from_file_location("check_data", path)
    check_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_data)
    make_atlas_dataset(tmp_path, "mnist", classes=3, per_class=2)
    voc = make_atlas_dataset(tmp_path, "pascal_voc", classes=3, per_class=2)
    assert check_data.main([str(tmp_path), "--datasets", "mnist", "pascal_voc", "svhn"]) == 0
    out = capsys.readouterr().out
    assert "mnist" in out and "found" in out and "svhn" in out and "missing" in out
    next((voc.path / "VOC2007" / "JPEGImages").glob("test*.jpg")).unlink()
    assert check_data.main([str(tmp_path), "--datasets", "pascal_voc"]) == 1
    assert "malformed" in capsys.readouterr().out
    assert check_data.main([str(tmp_path)]) == 1  # every dataset is listed by default, the 22 too
    out = capsys.readouterr().out
    assert all(name in out for name in ("cifar100", "ucf101_atlas", "country211"))


def test_templates_are_atlas_and_randlora_ones():
    for name in ATLAS22:
        assert get_templates(name, "atlas") == tuple(metadata()["templates"][ATLAS_NAMES[name]])
        assert all(template.count("{}") == 1 for template in get_templates(name, "atlas"))
    assert (
        len(get_templates("imagenet_atlas", "atlas")) == 80
        and len(get_templates("ucf101_atlas", "atlas")) == 48
    )
    # RandLoRA's get_templates gives every ImageNet variant ImageNet's templates.
    assert get_templates("imagenet_sketch", "atlas") == get_templates("imagenet_atlas", "atlas")
    assert get_templates("mnist", "atlas") == ('a photo of the number: "{}".',)
    # CoOp's own template for aTLAS's version of a CoOp dataset; CLIP's plain one where CoOp has none.
    assert get_templates("dtd_atlas", "coop") == (COOP_TEMPLATES["DescribableTextures"],)
    assert get_templates("cifar10", "coop") == ("a photo of a {}.",)


@needs_clip_benchmark
def test_clip_benchmark_templates_and_class_names():
    assert get_templates("cifar10", "clip_benchmark")[0] == "a photo of a {}."
    assert get_templates("gtsrb", "clip_benchmark")[0] == 'a zoomed in photo of a "{}" traffic sign.'
    assert get_templates("ucf101_atlas", "clip_benchmark") == get_templates(
        "imagenet_atlas", "clip_benchmark"
    )


@needs_clip_benchmark
def test_clip_benchmark_class_names_replace_the_default_ones(tmp_path, fabricated):
    make_atlas_dataset(tmp_path, "pascal_voc", classes=3, per_class=2)
    make_atlas_dataset(tmp_path, "eurosat_atlas", classes=3, per_class=2)
    make_atlas_dataset(tmp_path, "ucf101_atlas", classes=3, per_class=2)
    assert build_dataset("pascal_voc", tmp_path, "test").classnames[10] == "dining table"
    assert (
        build_dataset("pascal_voc", tmp_path, "test", classnames="clip_benchmark").classnames[10]
        == "diningtable"
    )
    # CLIP_benchmark's EuroSAT names are its ten classes in torchvision's order: three folders do not fit them.
    with pytest.raises(MalformedDatasetError, match="CLIP_benchmark names 10 classes, the data on disk 3"):
        build_dataset("eurosat_atlas", tmp_path, "test", classnames="clip_benchmark")
    with pytest.raises(ConfigError, match="CLIP_benchmark has no class names for 'ucf101_atlas'"):
        build_dataset("ucf101_atlas", tmp_path, "test", classnames="clip_benchmark")
    with pytest.raises(ConfigError, match="data.classnames must be one of default, clip_benchmark"):
        build_dataset("ucf101_atlas", tmp_path, "test", classnames="openai")


def test_randlora_epochs_cover_the_22():
    from kr_vlm.data.atlas import FRACTION_EPOCHS

    assert set(FRACTION_EPOCHS) == set(ATLAS22)
    assert (FRACTION_EPOCHS["dtd_atlas"], FRACTION_EPOCHS["svhn"]) == (76, 4)  # finetune.py: "DTD": 76, "SVHN": 4
