"""CoOp's `split_zhou_<Name>.json` split files (Caltech101, OxfordPets, StanfordCars, ...).

A split file is ``{"train": [[relative_path, label, classname], ...], "val": [...], "test": [...]}``
with paths relative to the dataset's image folder, as CoOp's `OxfordPets.read_split` reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

from kr_vlm.data.base import MalformedDatasetError
from kr_vlm.data.datasets.common import (
    Samples,
    classnames_by_label,
    readable_classname,
    require_dir,
    require_file,
)

SPLIT_KEYS = ("train", "val", "test")


def read_split_zhou(
    dataset_dir: Path, split: str, *, image_dir: str, split_file: str
) -> tuple[Samples, list[str]]:
    """Read `split` from `dataset_dir/split_file`, paths resolved under `dataset_dir/image_dir`.

    Class names come from the split file itself (all three splits, so every split sees the same
    table), with underscores shown as spaces.
    """
    split_path = require_file(dataset_dir / split_file, "CoOp split file")
    images = require_dir(dataset_dir / image_dir, "image folder") if image_dir else dataset_dir
    try:
        table = json.loads(split_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MalformedDatasetError(f"{split_path} is not valid JSON ({err}); download it again.") from err
    if not isinstance(table, dict) or any(key not in table for key in SPLIT_KEYS):
        raise MalformedDatasetError(f"{split_path} must be a JSON object with the keys {list(SPLIT_KEYS)}.")

    entries: dict[str, list[tuple[str, int, str]]] = {}
    for key in SPLIT_KEYS:
        try:
            entries[key] = [(str(path), int(label), str(name)) for path, label, name in table[key]]
        except (TypeError, ValueError) as err:
            raise MalformedDatasetError(
                f"{split_path}: every entry of {key!r} must be [relative_path, label, classname] ({err})."
            ) from err
    all_entries = [entry for key in SPLIT_KEYS for entry in entries[key]]
    classnames = classnames_by_label(((label, name) for _, label, name in all_entries), str(split_path))
    samples = [(str(images / path), label) for path, label, _ in entries[split]]
    return samples, [readable_classname(name) for name in classnames]
