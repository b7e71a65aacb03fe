"""CoOp's own pickles (split_fewshot/shot_K-seed_S.pkl, imagenet/preprocessed.pkl), read without Dassl.

The pickles are written here as CoOp writes them: Dassl `Datum` objects (the copy of Dassl's class
in reference_samplers, registered under Dassl's module name only while pickling), `pickle.HIGHEST_PROTOCOL`, with the
absolute paths of another machine.
"""

from __future__ import annotations

import os
import pickle
import random
import sys
import types
from pathlib import Path

import pytest

from coop_layout import make_coop_dataset
from kr_vlm.data.base import MalformedDatasetError
from kr_vlm.data.coop_files import DATUM_GLOBAL, UnsafePickleError, coop_fewshot_path, load_dassl_pickle
from kr_vlm.data.datamodules import FewShotDataModule
from kr_vlm.data.registry import build_dataset
from kr_vlm.errors import KrVlmError
from reference_samplers import Datum, generate_fewshot_dataset, set_random_seed

ELSEWHERE = "/home/someone/DATA"  # where CoOp ran and wrote its impaths


def coop_datum(impath: str, label: int) -> Datum:
    """A Dassl `Datum` of a file on CoOp's machine (its __init__ would check that the file is here)."""
    datum = Datum.__new__(Datum)
    datum.__dict__.update(_impath=impath, _label=label, _domain=0, _classname="x")
    return datum


def write_dassl_pickle(path: Path, lists: dict[str, list[tuple[str, int]]], monkeypatch) -> None:
    """Pickle `{key: [Datum]}` as CoOp does, with Dassl's module path and without Dassl installed."""
    module_name, class_name = DATUM_GLOBAL
    with monkeypatch.context() as patch:
        parts = module_name.split(".")
        for depth in range(1, len(parts) + 1):
            patch.setitem(sys.modules, ".".join(parts[:depth]), types.ModuleType(".".join(parts[:depth])))
        patch.setattr(Datum, "__module__", module_name)
        patch.setattr(sys.modules[module_name], class_name, Datum, raising=False)
        data = {key: [coop_datum(path, label) for path, label in items] for key, items in lists.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as file:
            pickle.dump(data, file, protocol=pickle.HIGHEST_PROTOCOL)
    assert "dassl" not in sys.modules


def elsewhere(samples, root: Path) -> list[tuple[str, int]]:
    """The samples as CoOp on another machine names them."""
    return [(path.replace(str(root), ELSEWHERE), label) for path, label in samples]


def pets_lists(root) -> dict[str, list[tuple[str, int]]]:
    return {split: build_dataset("oxford_pets", root, split).samples for split in ("train", "val")}


def pets_module(root, sampler="coop", shots=2, seed=1):
    dm = FewShotDataModule("oxford_pets", root=root, shots=shots, seed=seed, sampler=sampler, num_workers=0)
    dm.setup()
    return dm


def test_a_datum_pickle_reads_without_dassl(tmp_path, monkeypatch):
    path = tmp_path / "split.pkl"
    write_dassl_pickle(path, {"train": [("/a/b.jpg", 3)], "val": []}, monkeypatch)
    data = load_dassl_pickle(path)
    assert [(r.impath, r.label, r.classname) for r in data["train"]] == [("/a/b.jpg", 3, "x")]
    assert data["val"] == []
    assert "dassl" not in sys.modules


def test_coops_split_is_used_as_is_with_paths_of_another_machine(tmp_path, monkeypatch):
    make_coop_dataset(tmp_path, "oxford_pets", classes=3, per_class={"train": 6, "val": 5, "test": 1})
    reference = pets_module(tmp_path, sampler="kr_vlm")
    lists = pets_lists(tmp_path)
    train, val = lists["train"], lists["val"]
    # Not what any algorithm draws: the last two training images and the first two val images a class.
    stored_train = [item for label in range(3) for item in [s for s in train if s[1] == label][-2:]]
    stored_val = [item for label in range(3) for item in [s for s in val if s[1] == label][:2]]
    pickle_path = coop_fewshot_path(tmp_path / "oxford_pets", 2, 1)
    write_dassl_pickle(
        pickle_path,
        {"train": elsewhere(stored_train, tmp_path), "val": elsewhere(stored_val, tmp_path)},
        monkeypatch,
    )
    dm = pets_module(tmp_path)
    assert dm.train_dataset.samples == stored_train
    assert dm.val_datasets[0].samples == stored_val
    # Only sampler=coop reads CoOp's files.
    assert pets_module(tmp_path, sampler="kr_vlm").train_dataset.samples == reference.train_dataset.samples


@pytest.mark.parametrize(
    "broken",
    ["unknown image", "other label", "too many", "no val", "truncated", "not datum"],
)
def test_a_coop_split_that_does_not_fit_is_drawn_again(tmp_path, monkeypatch, broken):
    make_coop_dataset(tmp_path, "oxford_pets", classes=3, per_class={"train": 6, "val": 5, "test": 1})
    expected = pets_module(tmp_path)  # no pickle yet: CoOp's algorithm
    lists = {"train": expected.train_dataset.samples, "val": expected.val_datasets[0].samples}
    if broken == "unknown image":
        lists["train"] = [*lists["train"][:-1], (str(tmp_path / "oxford_pets/images/gone.jpg"), 2)]
    elif broken == "other label":
        lists["train"] = [(lists["train"][0][0], 1), *lists["train"][1:]]
    elif broken == "too many":
        lists["train"] = lists["train"] + lists["train"][:1]
    elif broken == "no val":
        del lists["val"]
    path = coop_fewshot_path(tmp_path / "oxford_pets", 2, 1)
    write_dassl_pickle(path, lists, monkeypatch)
    if broken == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    elif broken == "not datum":
        path.write_bytes(pickle.dumps({"train": [1, 2], "val": []}))
    with pytest.warns(UserWarning, match="Ignoring CoOp's few-shot split"):
        dm = pets_module(tmp_path)
    assert dm.train_dataset.samples == expected.train_dataset.samples
    assert dm.val_datasets[0].samples == expected.val_datasets[0].samples


class Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["split_fewshot", "preprocessed"])
def test_a_hostile_pickle_is_refused_before_it_runs(tmp_path, where):
    dataset = "imagenet" if where == "preprocessed" else "oxford_pets"
    make_coop_dataset(tmp_path, dataset, classes=2, per_class={"train": 5, "val": 2, "test": 1})
    marker = tmp_path / "pwned"
    folder = tmp_path / ("imagenet" if where == "preprocessed" else "oxford_pets")
    path = folder / "preprocessed.pkl" if where == "preprocessed" else coop_fewshot_path(folder, 2, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"train": [Hostile(marker)]}))
    dm = FewShotDataModule(dataset, root=tmp_path, shots=2, seed=1, sampler="coop", num_workers=0)
    with pytest.raises(KrVlmError, match=r"Refusing to load .*system.*could run code") as error:
        dm.setup()
    assert isinstance(error.value, UnsafePickleError) and isinstance(error.value, MalformedDatasetError)
    assert str(path) in str(error.value)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError):
        load_dassl_pickle(path)
    assert not marker.exists()


def test_imagenet_preprocessed_lists_set_coops_order_and_its_split_has_train_only(tmp_path, monkeypatch):
    make_coop_dataset(tmp_path, "imagenet", classes=3, per_class={"train": [7, 2, 5], "test": [2, 2, 2]})
    train = build_dataset("imagenet", tmp_path, "train").samples
    test = build_dataset("imagenet", tmp_path, "test").samples
    # CoOp listed the class folders (in sorted order) on another file system: each in its own order.
    coop_order = sorted(random.Random(0).sample(train, len(train)), key=lambda item: item[1])
    write_dassl_pickle(
        tmp_path / "imagenet" / "preprocessed.pkl",
        {"train": elsewhere(coop_order, tmp_path), "test": elsewhere(test, tmp_path)},
        monkeypatch,
    )
    for seed in (1, 2, 3):
        dm = FewShotDataModule("imagenet", root=tmp_path, shots=4, seed=seed, sampler="coop", num_workers=0)
        dm.setup()
        set_random_seed(seed)
        expected = generate_fewshot_dataset([Datum(p, label) for p, label in coop_order], num_shots=4)
        assert dm.train_dataset.samples == [(item.impath, item.label) for item in expected]
        assert dm.val_datasets[0].samples == dm.test_datasets[0].samples  # CoOp: val is test

    stored = [next(item for item in train[::-1] if item[1] == label) for label in range(3)]
    write_dassl_pickle(coop_fewshot_path(tmp_path / "imagenet", 1, 1), {"train": stored}, monkeypatch)
    dm = FewShotDataModule("imagenet", root=tmp_path, shots=1, seed=1, sampler="coop", num_workers=0)
    dm.setup()
    assert dm.train_dataset.samples == stored
    assert dm.val_datasets[0].samples == dm.test_datasets[0].samples
