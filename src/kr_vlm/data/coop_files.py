"""CoOp's own files in a dataset folder, read without Dassl, and CoOp's listing of ImageNet.

CoOp (KaiyangZhou/CoOp, `datasets/*.py`) keeps its few-shot draw as
`<dataset dir>/split_fewshot/shot_K-seed_S.pkl` (``{"train": [Datum], "val": [Datum]}``; ImageNet's
holds only ``"train"``) and ImageNet's full lists as `imagenet/preprocessed.pkl`
(``{"train": [Datum], "test": [Datum]}``). They are pickles of Dassl's
`dassl.data.datasets.base_dataset.Datum`. A pickle can run any code while it loads, so
`load_dassl_pickle` uses an unpickler that maps that one class to a plain record and refuses every
other global (`UnsafePickleError`): such a file is never a CoOp file.

A `Datum`'s `impath` is absolute on the machine that wrote it. It is matched to kr_vlm's samples
by its path inside the dataset folder (the longest tail of it that names one of the dataset's
files), so a data root that moved, or a `$DATA` folder copied from elsewhere, still works.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kr_vlm.data.base import MalformedDatasetError

log = logging.getLogger(__name__)

Samples = list[tuple[str, int]]

# Where pickle finds Dassl's Datum: the module that defines it (CoOp imports it through
# `dassl.data.datasets`, but a pickle names the defining module).
DATUM_GLOBAL = ("dassl.data.datasets.base_dataset", "Datum")
# CoOp's datasets whose lists come from folder listings rather than a split file.
LISTED_DATASETS = ("imagenet",)


class UnsafePickleError(MalformedDatasetError):
    """A pickle that names a global other than Dassl's `Datum`: refused before anything runs."""


@dataclass(frozen=True)
class DatumRecord:
    """A Dassl `Datum` as plain data."""

    impath: str
    label: int
    domain: int = 0
    classname: str = ""


class _PickledDatum:
    """What the unpickler builds for a `Datum`: pickle restores the instance dict through `__setstate__`."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _DatumOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        if (module, name) == DATUM_GLOBAL:
            return _PickledDatum
        raise UnsafePickleError(f"{module}.{name}")


def _record(item: Any, path: Path) -> DatumRecord:
    state = item.state if isinstance(item, _PickledDatum) else None
    if not isinstance(state, dict):
        raise MalformedDatasetError(
            f"{path} holds {type(item).__name__} objects where CoOp writes Datum objects"
        )
    impath, label = state.get("_impath"), state.get("_label")
    if not isinstance(impath, str) or not isinstance(label, int) or isinstance(label, bool):
        raise MalformedDatasetError(f"{path} holds a Datum without a path and a label: {state!r:.200}")
    domain = state.get("_domain", 0)
    classname = state.get("_classname", "")
    return DatumRecord(impath, label, domain if isinstance(domain, int) else 0, str(classname))


def load_dassl_pickle(path: str | Path) -> dict[str, list[DatumRecord]]:
    """Read a CoOp pickle of Dassl `Datum` lists (a dict of lists) without importing or trusting Dassl.

    Raises:
        UnsafePickleError: the file names another class or function (it could run code); nothing
            of it was run.
        MalformedDatasetError: the file is not a readable pickle of that shape.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = _DatumOnlyUnpickler(file).load()
    except UnsafePickleError as err:
        raise UnsafePickleError(
            f"Refusing to load {path}: it names {err}, but CoOp's split pickles hold only Dassl Datum objects, "
            "and loading it could run code. Delete the file, or put CoOp's own file there."
        ) from None
    except (
        OSError,
        EOFError,
        pickle.UnpicklingError,
        AttributeError,
        KeyError,
        IndexError,
        TypeError,
        ValueError,
        RecursionError,
    ) as err:  # what a damaged pickle raises; it cannot build anything but builtins and records
        raise MalformedDatasetError(f"{path} is not a readable pickle ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict) or not all(isinstance(items, list) for items in data.values()):
        raise MalformedDatasetError(f"{path} is not a dict of Datum lists, as CoOp writes")
    return {str(key): [_record(item, path) for item in items] for key, items in data.items()}


def match_records(
    records: Sequence[DatumRecord], samples: Sequence[tuple[str, int]], dataset_dir: Path, what: str
) -> Samples:
    """The samples (of `samples`, under `dataset_dir`) that `records` name, in the records' order.

    Raises `MalformedDatasetError` where a record names no file of `samples` or gives it another label.
    """
    prefix = str(dataset_dir).rstrip(os.sep) + os.sep
    by_tail = {
        path[len(prefix) :].replace(os.sep, "/"): (path, label)
        for path, label in samples
        if path.startswith(prefix)
    }
    matched: Samples = []
    for record in records:
        parts = [part for part in re.split(r"[\\/]+", record.impath) if part]
        found = next(
            (by_tail[tail] for i in range(len(parts)) if (tail := "/".join(parts[i:])) in by_tail), None
        )
        if found is None:
            raise MalformedDatasetError(f"{what} names {record.impath}, which is not in the dataset's list")
        if found[1] != record.label:
            raise MalformedDatasetError(
                f"{what} gives {record.impath} label {record.label}, the dataset's list label {found[1]}"
            )
        matched.append(found)
    return matched


def coop_fewshot_path(dataset_dir: str | Path, shots: int, seed: int) -> Path:
    """Where CoOp keeps its `shots`-shot draw for `seed`: `<dataset dir>/split_fewshot/shot_K-seed_S.pkl`."""
    return Path(dataset_dir) / "split_fewshot" / f"shot_{shots}-seed_{seed}.pkl"


def read_coop_fewshot(
    dataset_dir: Path, shots: int, seed: int, train: Samples, val: Samples | None
) -> tuple[Path, tuple[Samples, Samples | None]] | None:
    """CoOp's stored draw as `(path, (train, val))` in our samples, or None if CoOp left none here.

    `val=None` (ImageNet) reads only the training list, as CoOp stores only that.

    Raises:
        UnsafePickleError: see `load_dassl_pickle`.
        MalformedDatasetError: unreadable, or naming images that are not in the given lists.
    """
    path = coop_fewshot_path(dataset_dir, shots, seed)
    if not path.is_file():
        return None
    data = load_dassl_pickle(path)
    keys = ["train"] if val is None else ["train", "val"]
    missing = [key for key in keys if key not in data]
    if missing:
        raise MalformedDatasetError(f"{path} has no {missing[0]!r} list")
    stored_train = match_records(data["train"], train, dataset_dir, f"{path} (train)")
    stored_val = None if val is None else match_records(data["val"], val, dataset_dir, f"{path} (val)")
    return path, (stored_train, stored_val)


def listdir_order(samples: Sequence[tuple[str, int]]) -> Samples:
    """The samples of each folder in `os.listdir` order (CoOp's `listdir_nohidden`), folders as given.

    That order is whatever the file system returns, so it can differ between machines and copies.
    """
    folders: dict[str, Samples] = {}
    for path, label in samples:
        folders.setdefault(os.path.dirname(path), []).append((path, label))
    ordered: Samples = []
    for folder, items in folders.items():
        position = {name: index for index, name in enumerate(os.listdir(folder))}
        ordered.extend(sorted(items, key=lambda item: position.get(os.path.basename(item[0]), len(position))))
    return ordered


def coop_training_list(dataset: str, dataset_dir: Path, train: Samples) -> Samples:
    """The training list in the order CoOp draws from.

    For a split-file dataset that is the split file's order, which the readers keep. For ImageNet,
    CoOp lists each class folder (classes sorted) in `os.listdir` order and stores the lists in
    `imagenet/preprocessed.pkl`: that file is used when present (it makes the draw portable), else
    this machine's `os.listdir` order.
    """
    if dataset not in LISTED_DATASETS:
        return train
    preprocessed = dataset_dir / "preprocessed.pkl"
    if preprocessed.is_file():
        try:
            data = load_dassl_pickle(preprocessed)
            if "train" not in data:
                raise MalformedDatasetError(f"{preprocessed} has no 'train' list")
            listed = match_records(data["train"], train, dataset_dir, str(preprocessed))
        except UnsafePickleError:
            raise
        except MalformedDatasetError as err:
            warnings.warn(
                f"Ignoring CoOp's {preprocessed}: {err}; listing the training folders instead.",
                UserWarning,
                stacklevel=3,
            )
        else:
            log.info("Training images in the order of CoOp's %s", preprocessed)
            return listed
    return listdir_order(train)
