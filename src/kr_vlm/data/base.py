"""The two data types every reader returns and every model consumes.

`ClassificationTask` is all a model needs to classify one evaluation set (class names and the
prompt templates to embed them with); `ImageListDataset` is a plain list of `(path, label)` pairs
that opens images lazily with PIL.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile
from torch.utils.data import Dataset

from kr_vlm.errors import KrVlmError

log = logging.getLogger(__name__)


class CorruptImageError(KrVlmError, OSError):
    """An image file that PIL cannot open or decode completely."""


class DatasetNotFoundError(KrVlmError, FileNotFoundError):
    """A dataset folder, image folder or split file is not where the CoOp layout puts it."""


class MalformedDatasetError(KrVlmError, ValueError):
    """A dataset is on disk but its files disagree with the layout (bad JSON, gaps in labels, ...)."""


@dataclass(frozen=True)
class ClassificationTask:
    """What a model needs to classify one evaluation set.

    `classnames[i]` is the name of label `i`; each template holds one `{}` for the class name
    (e.g. ``"a photo of a {}."``). Lists are stored as tuples so a task is hashable.
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]

    def __post_init__(self) -> None:
        # frozen: normalise through object.__setattr__ so callers may pass lists.
        object.__setattr__(self, "classnames", tuple(self.classnames))
        object.__setattr__(self, "templates", tuple(self.templates))
        if not self.classnames:
            raise ValueError(f"ClassificationTask {self.name!r} has no class names.")
        if not self.templates:
            raise ValueError(f"ClassificationTask {self.name!r} has no templates.")
        bad = [t for t in self.templates if t.count("{}") != 1]
        if bad:
            raise ValueError(
                f"ClassificationTask {self.name!r}: every template needs exactly one '{{}}' for the "
                f"class name; these do not: {bad}"
            )


def load_rgb_image(path: str) -> Image.Image:
    """Open `path` with PIL, decode it fully and return it as RGB.

    PIL decodes lazily, so `load()` is forced here: a truncated file then fails now, naming the
    file, instead of deep inside a transform or a DataLoader worker.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Some other code switched PIL to pad truncated files silently; they cannot be detected then.
        warnings.warn(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images are padded silently instead of "
            "reported. Set it back to False to detect them.",
            RuntimeWarning,
            stacklevel=2,
        )
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CorruptImageError(
            f"Cannot read image {path!r}: {err}. Replace or delete the file, or pass "
            "skip_corrupt=true (data.skip_corrupt=true) to skip unreadable images."
        ) from err


def check_images_present(datasets: Sequence[ImageListDataset], skip_corrupt: bool = False) -> None:
    """Fail now, before any training, when image files that ``datasets`` list are not on disk: one
    `DatasetNotFoundError` naming the first few, how many, and the folder they should be in. With
    ``skip_corrupt`` they are only reported (the loaders skip them as unreadable)."""
    missing = {dataset.name: dataset.missing_files() for dataset in datasets}
    missing = {name: files for name, files in missing.items() if files}
    if not missing:
        return
    files = sorted({file for found in missing.values() for file in found})
    folder = os.path.commonpath([str(Path(file).parent) for file in files])
    shown = ", ".join(Path(file).relative_to(folder).as_posix() for file in files[:5])
    more = f" and {len(files) - 5} more" if len(files) > 5 else ""
    message = (
        f"{len(files)} image files listed by {', '.join(missing)} are missing under {folder}: {shown}{more}."
    )
    if skip_corrupt:
        log.warning("%s They are skipped (data.skip_corrupt=true).", message)
        return
    raise DatasetNotFoundError(
        f"{message} Copy the dataset again (data/README.md says where each comes from), or pass "
        "data.skip_corrupt=true to skip the missing images."
    )


class ImageListDataset(Dataset):
    """A classification dataset given as a list of `(image path, label)` pairs.

    Args:
        samples: `(path, label)` pairs; labels index `classnames`.
        classnames: class names, `classnames[label]` names the class of `label`.
        transform: applied to the PIL RGB image; settable later (`ds.transform = ...`).
        skip_corrupt: if False (default) an unreadable or truncated image raises
            `CorruptImageError` naming the file. If True, the bad sample is replaced by the next
            readable one (wrapping around), logged, and counted in `corrupt_count`.
        name: a label for messages and logs (e.g. ``"oxford_pets/test"``).
        open_image: how to get the image of a sample whose "path" is not an image file but an identity
            (an index into torchvision's arrays, ``<folder>/<split>#<index>``; an object cut out of a photo):
            a picklable callable from that string to a PIL image. None opens the file with PIL.

    `templates` are the prompt templates that came with the data (CLIP_benchmark's webdatasets ship
    theirs), None for most datasets, whose templates kr_vlm knows by name (`kr_vlm.data.templates`).

    `corrupt_count` counts the distinct bad files met in *this* process; with DataLoader workers
    each worker keeps its own count (the warnings in the log cover all of them).
    """

    templates: tuple[str, ...] | None = None

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        classnames: Sequence[str],
        transform: Callable[[Image.Image], Any] | None = None,
        skip_corrupt: bool = False,
        name: str = "",
        open_image: Callable[[str], Image.Image] | None = None,
    ) -> None:
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.open_image = open_image
        self._set_samples(samples, classnames, name)

    def with_samples(
        self, samples: Sequence[tuple[str, int]], classnames: Sequence[str], name: str
    ) -> ImageListDataset:
        """A dataset of the same kind, transform and image source holding only `samples` (a few-shot
        split, a class subset), labelled by `classnames`."""
        subset = copy.copy(self)
        subset._set_samples(samples, classnames, name)
        return subset

    def missing_files(self) -> list[str]:
        """The samples whose image file is not on disk. With `open_image`, its `file_of(sample)` names the
        file a sample comes from (None: an index into arrays, which reading the dataset already found). A
        subclass that draws its images (`load_image` overridden: digits, glyphs) has no files."""
        if type(self).load_image is not ImageListDataset.load_image:
            return []
        file_of = getattr(self.open_image, "file_of", lambda sample: sample)
        files = {file_of(path) for path, _ in self.samples}
        return sorted(file for file in files if file is not None and not Path(file).is_file())

    def _set_samples(self, samples: Sequence[tuple[str, int]], classnames: Sequence[str], name: str) -> None:
        self.samples: list[tuple[str, int]] = [(str(path), int(label)) for path, label in samples]
        self.classnames: list[str] = list(classnames)
        self.name = name
        self._corrupt_indices: set[int] = set()
        bad_labels = sorted({label for _, label in self.samples if not 0 <= label < len(self.classnames)})
        if bad_labels:
            raise ValueError(
                f"Dataset {name!r}: labels {bad_labels[:10]} are outside 0..{len(self.classnames) - 1} "
                f"({len(self.classnames)} class names)."
            )

    @property
    def corrupt_count(self) -> int:
        """How many distinct unreadable images were skipped so far (this process only)."""
        return len(self._corrupt_indices)

    @property
    def labels(self) -> list[int]:
        """The label of every sample, in order (no image is opened)."""
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not self.skip_corrupt:
            path, label = self.samples[index]
            return self._transformed(self.load_image(path)), label
        for offset in range(len(self.samples)):
            candidate = (index + offset) % len(self.samples)
            if candidate in self._corrupt_indices:
                continue
            path, label = self.samples[candidate]
            try:
                image = self.load_image(path)
            except CorruptImageError as err:
                self._corrupt_indices.add(candidate)
                log.warning(
                    "%s: skipping corrupt image %s (%d skipped so far): %s",
                    self.name or "dataset",
                    path,
                    self.corrupt_count,
                    err.__cause__ or err,
                )
                continue
            return self._transformed(image), label
        raise CorruptImageError(f"Dataset {self.name!r}: none of its {len(self.samples)} images is readable.")

    def load_image(self, path: str) -> Image.Image:
        """The RGB image of sample `path`; subclasses that draw their images override this."""
        if self.open_image is None:
            return load_rgb_image(path)
        return self.open_image(path).convert("RGB")

    def _transformed(self, image: Image.Image) -> Any:
        return self.transform(image) if self.transform is not None else image

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, samples={len(self.samples)}, "
            f"classes={len(self.classnames)}, skip_corrupt={self.skip_corrupt})"
        )
