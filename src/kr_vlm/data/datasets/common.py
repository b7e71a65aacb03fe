"""Small helpers every reader shares: checked paths, sorted listings, class-name tables."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from kr_vlm.data.base import DatasetNotFoundError, MalformedDatasetError

Samples = list[tuple[str, int]]


def require_dir(path: Path, what: str) -> Path:
    """Return `path` if it is a folder, else raise `DatasetNotFoundError` naming it."""
    if not path.is_dir():
        raise DatasetNotFoundError(f"Missing {what}: expected the folder {path}")
    return path


def require_file(path: Path, what: str) -> Path:
    """Return `path` if it is a file, else raise `DatasetNotFoundError` naming it."""
    if not path.is_file():
        raise DatasetNotFoundError(f"Missing {what}: expected the file {path}")
    return path


def sorted_subdirs(folder: Path) -> list[str]:
    """Names of the visible sub-folders of `folder`, sorted (files such as README.txt are ignored)."""
    return sorted(
        entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith(".")
    )


def sorted_files(folder: Path) -> list[Path]:
    """The visible files of `folder`, sorted so every machine lists them in the same order.

    Like CoOp's `listdir_nohidden`, every non-hidden file counts as an image: a stray file shows up
    as an unreadable image rather than silently changing the counts.
    """
    return sorted(entry for entry in folder.iterdir() if entry.is_file() and not entry.name.startswith("."))


def readable_classname(name: str) -> str:
    """The class name as it goes into a prompt: CoOp and CLIP-LoRA replace underscores by spaces."""
    return name.replace("_", " ").strip()


def classnames_by_label(pairs: Iterable[tuple[int, str]], source: str) -> list[str]:
    """Build `classnames[label]` from `(label, classname)` pairs, checking they are consistent.

    Every label must always carry the same name and the labels must be exactly 0 .. n-1.
    """
    names: dict[int, str] = {}
    for label, name in pairs:
        if names.setdefault(label, name) != name:
            raise MalformedDatasetError(
                f"{source}: label {label} is called both {names[label]!r} and {name!r}."
            )
    if not names:
        raise MalformedDatasetError(f"{source}: no samples found.")
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing or min(names) < 0:
        raise MalformedDatasetError(
            f"{source}: labels must be 0..n-1 without gaps; found {len(names)} labels from {min(names)} to "
            f"{max(names)}, missing {missing[:10]}."
        )
    return [names[label] for label in range(len(names))]


def read_wnid_classnames(path: Path) -> dict[str, str]:
    """Read an ImageNet `classnames.txt` (`<wnid> <class name>` per line) in file order."""
    require_file(path, "ImageNet class-name file")
    classnames: dict[str, str] = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not name.strip():
            raise MalformedDatasetError(
                f"{path}, line {line_number}: expected '<wnid> <class name>', got {line!r}."
            )
        classnames[wnid] = name.strip()
    return classnames
