"""CLIP_benchmark as a data source (`data=clip_benchmark data.name=...`): its webdatasets from a local folder or
the Hugging Face cache offline, its torchvision-style sets, a few-shot draw from them, and a zero-shot
evaluation of the miniature CLIP on a webdataset written by CLIP_benchmark's own exporter."""

from __future__ import annotations

import json
import warnings

import huggingface_hub
import numpy as np
import pytest
from PIL import Image

from atlas_layout import label_colour, label_of, make_atlas_dataset
from benchmark_helpers import needs_clip_benchmark
from compose_helpers import compose_config, run_state_restored
from kr_vlm import cli
from kr_vlm.data import ClipBenchmarkDataModule, build_dataset
from kr_vlm.data.base import DatasetNotFoundError
from kr_vlm.data.digits import CLASSNAMES as DIGIT_NAMES

pytestmark = needs_clip_benchmark
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}."]


@pytest.fixture(autouse=True)
def _clear_hydra():
    with run_state_restored():
        yield


class Pairs(list):
    """(PIL image, label) pairs with the `classes` and `templates` CLIP_benchmark's exporter writes out."""

    classes: list[str]
    templates: list[str]


def export(folder, split: str, pairs: list, classes: list[str], max_count: int = 7) -> None:
    """Write `pairs` with CLIP_benchmark's `convert_dataset` (its webdataset exporter), several shards."""
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset

    dataset = Pairs(pairs)
    dataset.classes, dataset.templates = classes, TEMPLATES
    with warnings.catch_warnings():  # its loader asks for 8 workers, more than the machine's cores
        warnings.simplefilter("ignore", UserWarning)
        convert_dataset(dataset, split, str(folder), transform=PIL_to_bytes("png"), image_format="png",
                        max_count=max_count, verbose=False)  # fmt: skip


def coloured(count: int, classes: int) -> list:
    return [
        (Image.new("RGB", (12, 12), label_colour(index % classes)), index % classes) for index in range(count)
    ]


def test_a_local_webdataset_is_read_with_its_class_names_and_templates(tmp_path):
    folder = tmp_path / "data" / "clip_benchmark" / "wds_tiny-colours"
    export(folder, "test", coloured(17, 3), ["red", "green", "blue"])
    dataset = build_dataset("clip_benchmark/wds/tiny/colours", tmp_path / "data", "test")
    assert len(dataset) == 17 and dataset.classnames == ["red", "green", "blue"]
    assert dataset.templates == ("a photo of a {}.", "a drawing of the {}.")
    assert len({sample.partition("#")[0] for sample, _ in dataset.samples}) == 3  # 17 samples in 3 shards
    for index, (_, label) in enumerate(dataset.samples):
        assert label_of(dataset[index][0]) == label
    assert dataset.missing_files() == []


def test_a_few_shot_draw_from_a_webdataset_train_split(tmp_path):
    folder = tmp_path / "data" / "clip_benchmark" / "wds_tiny"
    export(folder, "train", coloured(30, 3), ["red", "green", "blue"])
    export(folder, "test", coloured(6, 3), ["red", "green", "blue"])

    def module():
        datamodule = ClipBenchmarkDataModule(name="wds/tiny", root=tmp_path / "data", shots=2, num_workers=0,
                                             eval_templates="clip_benchmark",
                                             train_templates="clip_benchmark")  # fmt: skip
        datamodule.setup("fit")
        return datamodule

    first, second = module(), module()
    assert first.dataset == "clip_benchmark/wds/tiny" and len(first.train_dataset) == 6
    assert first.train_dataset.samples == second.train_dataset.samples
    assert first.train_task.templates == ("a photo of a {}.", "a drawing of the {}.")
    for dataset in (first.train_dataset, first.val_datasets[0]):
        for index, (_, label) in enumerate(dataset.samples):
            assert label_of(dataset[index][0]) == label


def test_a_webdataset_in_the_hugging_face_cache_is_read_offline(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    repo = hub / "datasets--clip-benchmark--wds_vtab-tiny"
    export(repo / "snapshots" / COMMIT, "test", coloured(5, 2), ["cat", "dog"])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    (tmp_path / "data").mkdir()
    dataset = build_dataset("clip_benchmark/wds/vtab/tiny", tmp_path / "data", "test")
    assert dataset.classnames == ["cat", "dog"] and len(dataset) == 5
    with pytest.raises(DatasetNotFoundError) as error:
        build_dataset("clip_benchmark/wds/vtab/absent", tmp_path / "data", "test")
    message = str(error.value)
    assert str(tmp_path / "data" / "clip_benchmark" / "wds_vtab-absent") in message
    assert "clip-benchmark/wds_vtab-absent" in message and "data.download=true" in message


def test_a_torchvision_style_set_is_built_by_clip_benchmark_without_downloading(tmp_path, monkeypatch):
    import clip_benchmark.datasets.builder as builder

    monkeypatch.setattr(builder, "call", lambda *args, **kwargs: pytest.fail(f"CLIP_benchmark ran {args}"))
    make_atlas_dataset(tmp_path / "data" / "clip_benchmark" / "mnist", "mnist", classes=3, per_class=3)
    dataset = build_dataset("clip_benchmark/mnist", tmp_path / "data", "test")
    assert dataset.classnames == [str(digit) for digit in range(10)] and len(dataset) == 9
    assert dataset.templates[0] == 'a photo of the number: "{}".'  # CLIP_benchmark's MNIST prompts
    assert [label_of(dataset[index][0]) for index in range(9)] == dataset.labels
    with pytest.raises(DatasetNotFoundError, match="clip_benchmark/imagenet-a"):
        build_dataset("clip_benchmark/imagenet-a", tmp_path / "data", "test")  # it would wget it


def test_zero_shot_evaluation_of_the_miniature_clip_on_a_webdataset(tmp_path):
    digits = build_dataset("digits", tmp_path, "test")
    pairs = [(digits.load_image(path), label) for path, label in digits.samples[::3]]
    folder = tmp_path / "wds_digits"
    export(folder, "test", pairs, list(DIGIT_NAMES), max_count=100)
    cfg = compose_config(
        tmp_path,
        ["experiment=mini_zeroshot", "data=clip_benchmark", "data.name=wds/kr_digits",
         f"data.dataset_root={folder}", "data.num_workers=0", f"paths.output_dir={tmp_path / 'run'}"],
        "eval",
    )  # fmt: skip
    metrics = cli.evaluate(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["dataset"] == "clip_benchmark/wds/kr_digits" and list(saved["test"]) == [saved["dataset"]]
    top1 = saved["test"]["clip_benchmark/wds/kr_digits"]["top1"]
    # The miniature CLIP reads digits zero-shot (about 74 % on them with this template): far above chance.
    assert top1 > 0.5 and metrics is not None
    assert np.isclose(top1, saved["test"][saved["dataset"]]["top1"])
