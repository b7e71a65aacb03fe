"""Few-shot splits: kr_vlm's own draw and exact copies of CoOp's and CLIP-LoRA's, a JSON cache, base-to-new.

Every sampler takes K training and min(K, 4) validation images per class (or `val_shots`, where a
caller asks for another validation size: `data.val_shots`); they differ in order,
in what a class with fewer than K images gives, and in where ImageNet's validation shots come from:

- `kr_vlm` (the default): each class's samples sorted by path, classes in label order, the training
  shots drawn first, then the validation shots; a class with fewer than K images is drawn with
  replacement (`choices`). The split depends only on the set of files, never on how a file system
  or a split file lists them, so it is the same on every machine.
- `coop`: CoOp / Dassl (`DatasetBase.generate_fewshot_dataset`, called by every CoOp dataset class):
  the split file's order, classes in order of first appearance, `random.sample` per class, training
  shots first, then validation shots, and a class with fewer than K images gives all of them
  (`repeat=False`). CoOp's own `split_fewshot/shot_K-seed_S.pkl` in the dataset folder is used as
  is when it is there (`kr_vlm.data.coop_files`).
- `clip_lora`: CLIP-LoRA (`datasets/*.py`): as Dassl, but the validation shots are drawn first,
  then the training shots, and a class with fewer than K images is drawn with replacement
  (`repeat=True`, `random.choices`).
- `atlas`: aTLAS's and RandLoRA's `get_n_shots` (`kr_vlm.data.atlas.atlas_shots`): per class in label
  order, the last K of a `torch.randperm` of its images in list order (a class with fewer gives all),
  from a `torch.Generator` seeded with the seed; the validation shots are the min(K, 4) before them in
  the same permutation, or drawn so from the val split where there is one.

ImageNet has no validation split of its own (its val folder is its test set): callers pass
`val_samples=None`. `kr_vlm` then draws min(K, 4) validation images per class from the training
images left after the training shots; `clip_lora` draws K + min(K, 4) images per class at once,
as CLIP-LoRA's ImageNet reader does, and splits them into training and validation; `coop` draws
no validation shots, since CoOp validates on the test set (`FewShotSplit.val` is None).

CoOp and CLIP-LoRA seed Python's global `random` with the run seed and draw nothing from it before
the split. The module-level functions of `random` are methods of one hidden `random.Random`
seeded the same way, so a `random.Random(seed)` of our own draws the very same images and leaves
the global state alone (tests/test_sampler_references.py checks this against both references).

A cached split is keyed by dataset, sampler, shots, seed and a hash of the source file lists (for
`coop` and `clip_lora`, whose draws depend on the order, a hash of the lists as ordered), so a
changed dataset gets a fresh split instead of a stale one. A cache file that cannot be read, or
that does not fit the source lists, is ignored with a warning and drawn again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kr_vlm.data.atlas import atlas_shots
from kr_vlm.data.base import MalformedDatasetError
from kr_vlm.data.coop_files import UnsafePickleError, coop_training_list, read_coop_fewshot
from kr_vlm.errors import ConfigError
from kr_vlm.files import write_text_atomic

log = logging.getLogger(__name__)

Samples = list[tuple[str, int]]

# Stored in every cache file; bump it when a draw changes so old caches are not reused.
SAMPLER_VERSION = 2
SAMPLERS = ("kr_vlm", "coop", "clip_lora", "atlas")
SUBSAMPLE_CHOICES = ("all", "base", "new")
# The cache folder under the data root that `paths.cache_dir` names by default.
DEFAULT_CACHE_FOLDER = ".kr_vlm_cache"

# Cache folders already reported as replaced by the per-user one (the warning comes once a process).
_reported_fallbacks: set[Path] = set()


@dataclass(frozen=True)
class FewShotSplit:
    """The drawn training and validation samples, `(path, label)` pairs, in the order they were drawn.

    `val` is None where no validation shots were drawn because the dataset validates on its test
    split (ImageNet with `sampler="coop"`, as CoOp).
    """

    train: Samples
    val: Samples | None


def validation_shots(shots: int, val_shots: int | None = None) -> int:
    """Validation images per class for a `shots`-shot split: `val_shots` when given, else min(shots, 4),
    as CoOp and CLIP-LoRA."""
    return min(shots, 4) if val_shots is None else val_shots


def check_sampler(sampler: str) -> None:
    """Raise `ConfigError` (naming `data.sampler` and the choices) unless `sampler` is a known one."""
    if sampler not in SAMPLERS:
        raise ConfigError(
            f"data.sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}: kr_vlm (portable), coop "
            "(CoOp's draw, image for image), clip_lora (CLIP-LoRA's draw) or atlas (aTLAS's / RandLoRA's)."
        )


def group_by_label(samples: Sequence[tuple[str, int]], canonical: bool = True) -> dict[int, Samples]:
    """The samples of each label.

    `canonical` (kr_vlm): labels in increasing order, each class sorted by path. Otherwise as Dassl's
    `split_dataset_by_label`: labels in order of first appearance, each class in the given order.
    """
    groups: dict[int, Samples] = defaultdict(list)
    for path, label in samples:
        groups[int(label)].append((str(path), int(label)))
    if not canonical:
        return dict(groups)
    return {label: sorted(groups[label]) for label in sorted(groups)}


def sample_per_class(
    samples: Sequence[tuple[str, int]],
    shots: int,
    rng: random.Random,
    *,
    repeat: bool = True,
    canonical: bool = True,
) -> Samples:
    """Draw `shots` samples of every label present in `samples`, using `rng`: Dassl's per-class draw.

    `rng.sample` where a class has at least `shots` samples; where it has fewer, `rng.choices`
    (with replacement) if `repeat`, else all of them. `canonical` orders the classes and their
    samples first (see `group_by_label`); without it the draw follows the given order, as Dassl's.
    """
    if shots < 1:
        raise ValueError(f"shots must be at least 1 to sample a few-shot split, got {shots}.")
    sampled: Samples = []
    for items in group_by_label(samples, canonical).values():
        if len(items) >= shots:
            sampled.extend(rng.sample(items, shots))
        elif repeat:
            sampled.extend(rng.choices(items, k=shots))
        else:
            sampled.extend(items)
    return sampled


# Each draw takes the source lists, the training shots, the validation images per class (`val_count`)
# and the seed.
def _draw_kr_vlm(train: Samples, val: Samples | None, shots: int, val_count: int, seed: int) -> FewShotSplit:
    rng = random.Random(seed)
    train_shots = sample_per_class(train, shots, rng)
    if val is not None:
        return FewShotSplit(train_shots, sample_per_class(val, val_count, rng))
    # No validation split (ImageNet): validate on training images the training shots left over.
    taken = set(train_shots)
    val_shots: Samples = []
    for items in group_by_label(train).values():
        left = [item for item in items if item not in taken]
        val_shots.extend(rng.sample(left, min(val_count, len(left))))
    return FewShotSplit(train_shots, val_shots)


def _draw_coop(train: Samples, val: Samples | None, shots: int, val_count: int, seed: int) -> FewShotSplit:
    rng = random.Random(seed)
    train_shots = sample_per_class(train, shots, rng, repeat=False, canonical=False)
    if val is None:  # CoOp's ImageNet validates on its test set
        return FewShotSplit(train_shots, None)
    return FewShotSplit(train_shots, sample_per_class(val, val_count, rng, repeat=False, canonical=False))


def _draw_clip_lora(train: Samples, val: Samples | None, shots: int, val_count: int, seed: int) -> FewShotSplit:
    rng = random.Random(seed)
    if val is not None:
        val_shots = sample_per_class(val, val_count, rng, canonical=False)
        return FewShotSplit(sample_per_class(train, shots, rng, canonical=False), val_shots)
    # CLIP-LoRA's ImageNet reader: ImageFolder's files, K + min(K, 4) (the validation count) of each class
    # at once.
    from torchvision.datasets.folder import IMG_EXTENSIONS

    # Samples that are not files (`<source>#<index>`, aTLAS's arrays and crops) are images by construction.
    images = [item for item in train if "#" in item[0] or item[0].lower().endswith(IMG_EXTENSIONS)]
    per_class = shots + val_count
    train_shots: Samples = []
    val_shots: Samples = []
    for label, items in group_by_label(images, canonical=False).items():
        if len(items) < per_class:
            raise ConfigError(
                f"data.sampler=clip_lora draws {per_class} different training images of every ImageNet class "
                f"for {shots} shots and {val_count} validation images (CLIP-LoRA's random.sample of K + "
                f"min(K, 4)), but label {label} has only {len(items)}. Lower data.shots (or data.val_shots), or "
                "use data.sampler=kr_vlm."
            )
        drawn = rng.sample(items, per_class)
        train_shots.extend(drawn[:shots])
        val_shots.extend(drawn[shots:])
    return FewShotSplit(train_shots, val_shots)


def _draw_atlas(train: Samples, val: Samples | None, shots: int, val_count: int, seed: int) -> FewShotSplit:
    generator = torch.Generator().manual_seed(seed)
    train_shots, val_shots = atlas_shots(train, shots, val_count, generator, with_val=val is None)
    if val is not None:
        val_shots = atlas_shots(val, val_count, 0, generator, with_val=False)[0]
    return FewShotSplit(train_shots, val_shots)


_DRAWS: dict[str, Callable[[Samples, Samples | None, int, int, int], FewShotSplit]] = {
    "kr_vlm": _draw_kr_vlm,
    "coop": _draw_coop,
    "clip_lora": _draw_clip_lora,
    "atlas": _draw_atlas,
}


def source_hash(*sample_lists: Sequence[tuple[str, int]], ordered: bool = False) -> str:
    """A hash of the given sample lists (hex SHA-256); `ordered=False` ignores their order.

    Any added, removed, renamed or relabelled file changes it; listing the same files in another
    order changes it only with `ordered` (the draws of CoOp and CLIP-LoRA depend on the order).
    """
    digest = hashlib.sha256()
    for samples in sample_lists:
        canonical = [(str(path), int(label)) for path, label in samples]
        if not ordered:
            canonical.sort()
        digest.update(json.dumps(canonical, separators=(",", ":")).encode("utf-8"))
        digest.update(b"\x00")  # keeps ([a], [b]) apart from ([a, b], [])
    return digest.hexdigest()


def cache_path(
    cache_dir: str | Path,
    dataset: str,
    shots: int,
    seed: int,
    source_digest: str,
    sampler: str = "kr_vlm",
    val_shots: int | None = None,
) -> Path:
    """Where the split of `dataset` drawn by `sampler` with `shots`, `seed` (and `val_shots` validation
    images per class, where that is not the default min(shots, 4)) is cached."""
    val = validation_shots(shots, val_shots)
    other_val = "" if val == validation_shots(shots) else f"-val_{val}"
    name = f"shot_{shots}-seed_{seed}-{sampler}{other_val}-{source_digest[:16]}.json"
    return Path(cache_dir) / dataset / name


def user_cache_dir() -> Path:
    """The per-user cache folder: `$XDG_CACHE_HOME/kr_vlm`, else `~/.cache/kr_vlm`."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "kr_vlm"


def _writable(folder: Path) -> bool:
    """Whether `folder` is (or can be made) a folder this process may write in; creates it if so."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    # Checked before mkdir, so a read-only data root does not get an empty cache folder.
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def resolve_cache_dir(cache_dir: str | Path | None, data_root: str | Path) -> Path | None:
    """The folder to cache few-shot splits in, for the configured `cache_dir` (None: no cache).

    The default, `<data root>/.kr_vlm_cache`, gives way to `user_cache_dir()` when the data root
    cannot be written (shared read-only datasets), with one warning. Any other folder is used as
    given: if it cannot be written, that is a `ConfigError` naming `paths.cache_dir`.
    """
    if cache_dir is None:
        return None
    folder = Path(cache_dir).expanduser().absolute()
    if _writable(folder):
        return folder
    fix = "Point paths.cache_dir at a folder you can write (it holds small JSON files), or set it to null."
    if folder != Path(data_root).expanduser().absolute() / DEFAULT_CACHE_FOLDER:
        raise ConfigError(f"The few-shot cache folder {folder} (paths.cache_dir) cannot be written. {fix}")
    fallback = user_cache_dir().absolute()
    if not _writable(fallback):
        raise ConfigError(
            f"Neither the default few-shot cache folder {folder} nor the per-user one {fallback} can be "
            f"written. {fix}"
        )
    if folder not in _reported_fallbacks:
        _reported_fallbacks.add(folder)
        log.warning(
            "The data root is not writable: few-shot splits are cached in %s instead of %s.", fallback, folder
        )
    return fallback


def warn_short_classes(
    samples: Sequence[tuple[str, int]],
    shots: int,
    what: str,
    classnames: Sequence[str] | None = None,
    consequence: str = "they are sampled with replacement",
) -> None:
    """Warn (once, naming them) about the classes with fewer than `shots` samples.

    With `classnames`, a class that has no sample at all is reported too (it cannot be sampled).
    `consequence` says what the sampler does with such a class.
    """
    counts = {label: len(items) for label, items in group_by_label(samples).items()}
    labels = range(len(classnames)) if classnames is not None else counts
    short = [label for label in labels if counts.get(label, 0) < shots]
    if short:
        described = [
            f"{classnames[label]!r} ({counts.get(label, 0)})"
            if classnames is not None
            else f"label {label} ({counts.get(label, 0)})"
            for label in short
        ]
        warnings.warn(
            f"{what}: {len(short)} classes have fewer than {shots} images; {consequence}, and a class with 0 "
            f"images gets none: {', '.join(described)}.",
            UserWarning,
            stacklevel=3,
        )


def _warn_about_short_classes(
    dataset: str,
    train: Samples,
    val: Samples | None,
    shots: int,
    val_count: int,
    sampler: str,
    classnames: Sequence[str] | None,
) -> None:
    consequence = (
        "all their images are used, so they get fewer (CoOp's repeat=False)"
        if sampler == "coop"
        else "they are sampled with replacement"
    )
    warn_short_classes(train, shots, f"{dataset} train", classnames, consequence)
    if val is not None:
        warn_short_classes(val, val_count, f"{dataset} val", classnames, consequence)
    elif sampler == "kr_vlm":
        warn_short_classes(
            train,
            shots + val_count,
            f"{dataset} train (validation shots are drawn from it)",
            classnames,
            "they get fewer validation images",
        )


def _label_counts(samples: Sequence[tuple[str, int]]) -> dict[int, int]:
    return {label: len(items) for label, items in group_by_label(samples).items()}


def _expected_counts(
    sampler: str, train: Samples, val: Samples | None, shots: int, val_count: int, train_shots: Samples
) -> tuple[dict[int, int], dict[int, int] | None]:
    """How many training and validation images of each label `sampler` draws from these lists."""
    keep_short = sampler in ("coop", "atlas")  # repeat=False: a short class gives what it has
    k, v = shots, val_count
    train_counts = _label_counts(train)
    want_train = {label: min(k, n) if keep_short else k for label, n in train_counts.items()}
    if val is not None:
        return want_train, {label: min(v, n) if keep_short else v for label, n in _label_counts(val).items()}
    if sampler == "coop":
        return want_train, None
    if sampler == "clip_lora":
        return want_train, dict.fromkeys(train_counts, v)
    if sampler == "atlas":  # the min(K, 4) before the training shots in each class's permutation
        return want_train, {label: min(v, n - min(k, n)) for label, n in train_counts.items()}
    distinct_shots = _label_counts(sorted(set(train_shots)))
    return want_train, {label: min(v, n - distinct_shots.get(label, 0)) for label, n in train_counts.items()}


def split_misfit(
    split: FewShotSplit,
    train_samples: Sequence[tuple[str, int]],
    val_samples: Sequence[tuple[str, int]] | None,
    shots: int,
    sampler: str,
    val_shots: int | None = None,
) -> str | None:
    """Why `split` cannot be what `sampler` draws from these source lists with `shots` and `val_shots`
    (`validation_shots`) (None if it can).

    Every image must be one of its source list, with the same label, and every class must have as
    many images as the sampler draws of it; validation shots drawn from the training list (no
    validation list) must not be training shots. A file read back (cache, CoOp's pickle) is checked
    with it, so a hand-edited or foreign file is never trained on.
    """
    train = [(str(path), int(label)) for path, label in train_samples]
    val = None if val_samples is None else [(str(path), int(label)) for path, label in val_samples]
    want_train, want_val = _expected_counts(
        sampler, train, val, shots, validation_shots(shots, val_shots), split.train
    )
    if (split.val is None) != (want_val is None):
        return (
            "it has no validation list"
            if split.val is None
            else "it has a validation list CoOp does not draw"
        )
    checks = [("train", split.train, set(train), want_train)]
    if split.val is not None and want_val is not None:
        checks.append(("val", split.val, set(train if val is None else val), want_val))
    for name, drawn, source, want in checks:
        strangers = [item for item in drawn if item not in source]
        if strangers:
            return f"its {name} list holds {len(strangers)} images not in the dataset's list, e.g. {strangers[0]}"
        counts = _label_counts(drawn)
        wrong = [
            label for label in sorted(set(want) | set(counts)) if counts.get(label, 0) != want.get(label, 0)
        ]
        if wrong:
            label = wrong[0]
            return f"its {name} list has {counts.get(label, 0)} images of label {label}, not {want.get(label, 0)}"
    if split.val is not None and val is None and set(split.val) & set(split.train):
        return "some validation images are also training images"
    return None


def few_shot_split(
    dataset: str,
    train_samples: Sequence[tuple[str, int]],
    val_samples: Sequence[tuple[str, int]] | None,
    shots: int,
    seed: int,
    cache_dir: str | Path | None = None,
    classnames: Sequence[str] | None = None,
    *,
    sampler: str = "kr_vlm",
    dataset_dir: str | Path | None = None,
    val_shots: int | None = None,
) -> FewShotSplit:
    """Draw `shots` training and min(`shots`, 4) (or `val_shots`) validation images per class with `sampler`.

    Args:
        dataset: the dataset name; part of the cache key and of messages.
        train_samples: the full training split, `(path, label)` pairs. `kr_vlm` ignores their order;
            `coop` and `clip_lora` follow it, so pass them as the split file lists them (the
            readers of `kr_vlm.data.registry` do).
        val_samples: the full validation split; None for a dataset whose validation split is its
            test split (ImageNet): see the module docstring for where the validation shots come from.
        shots: images per class to train on (at least 1).
        seed: the run seed (CoOp and CLIP-LoRA report seeds 1, 2, 3); every sampler draws from one
            `random.Random(seed)`.
        cache_dir: if given, the split is read from / written to a JSON file under it (see
            `cache_path`); None draws afresh every time (the result is the same).
        classnames: used to name the classes in the warning about classes with too few images.
        sampler: `kr_vlm`, `coop` or `clip_lora` (module docstring).
        dataset_dir: the dataset's folder (CoOp's `dataset_dir`). With `sampler="coop"`, CoOp's own
            `split_fewshot/shot_K-seed_S.pkl` there is used as is, and for ImageNet CoOp's listing
            of the training images (its `preprocessed.pkl`, else `os.listdir` order).
        val_shots: validation images per class; None: min(`shots`, 4), as CoOp and CLIP-LoRA. The
            validation images come from the validation split (or, without one, from the training
            images the training shots left), never from the test split. CoOp's stored splits hold
            min(K, 4), so with another count `coop` draws its split instead of reading them.

    Returns:
        a `FewShotSplit`, each list in the order the sampler drew it.
    """
    check_sampler(sampler)
    if shots < 1:
        raise ValueError(f"shots must be at least 1 for a few-shot split, got {shots} (0 means zero-shot).")
    if val_shots is not None and val_shots < 1:
        raise ValueError(f"val_shots must be at least 1 (or None for min(shots, 4)), got {val_shots}.")
    val_count = validation_shots(shots, val_shots)
    train = [(str(path), int(label)) for path, label in train_samples]
    val = None if val_samples is None else [(str(path), int(label)) for path, label in val_samples]
    # The warnings come from the source lists, so they also appear when the split is read from a file.
    _warn_about_short_classes(dataset, train, val, shots, val_count, sampler, classnames)

    if sampler == "coop" and dataset_dir is not None and val_count == validation_shots(shots):
        stored = _read_coop_split(Path(dataset_dir), shots, seed, train, val)
        if stored is not None:
            return stored
        train = coop_training_list(dataset, Path(dataset_dir), train)

    path = None
    if cache_dir is not None:
        digest = source_hash(train, val or [], ordered=sampler != "kr_vlm")
        path = cache_path(cache_dir, dataset, shots, seed, digest, sampler, val_count)
        cached = _read_cache(path, dataset, shots, seed, sampler, train, val, val_count)
        if cached is not None:
            log.info(
                "Read the %d-shot split of %s (seed %d, %s) from %s", shots, dataset, seed, sampler, path
            )
            return cached

    split = _DRAWS[sampler](train, val, shots, val_count, seed)
    if path is not None:
        try:
            _write_cache(path, dataset, shots, seed, sampler, split)
            log.info("Wrote the %d-shot split of %s (seed %d, %s) to %s", shots, dataset, seed, sampler, path)
        except OSError as err:  # a full or read-only disk: the cache only saves drawing the split again
            warnings.warn(
                f"Cannot write the few-shot cache {path} ({err.strerror or err}); going on without it. Free "
                f"disk space there, or point paths.cache_dir at a writable folder (null: no cache).",
                stacklevel=2,
            )
    return split


def _read_coop_split(
    dataset_dir: Path, shots: int, seed: int, train: Samples, val: Samples | None
) -> FewShotSplit | None:
    try:
        stored = read_coop_fewshot(dataset_dir, shots, seed, train, val)
    except UnsafePickleError:
        raise
    except MalformedDatasetError as err:  # unreadable, or naming images the dataset does not have
        warnings.warn(f"Ignoring CoOp's few-shot split: {err}; drawing it again.", UserWarning, stacklevel=3)
        return None
    if stored is None:
        return None
    path, (stored_train, stored_val) = stored
    split = FewShotSplit(stored_train, stored_val)
    reason = split_misfit(split, train, val, shots, "coop")
    if reason is not None:
        warnings.warn(
            f"Ignoring CoOp's few-shot split {path}: {reason}; drawing it again.", UserWarning, stacklevel=3
        )
        return None
    log.info("Using CoOp's %d-shot split (seed %d) from %s", shots, seed, path)
    return split


def _read_cache(
    path: Path,
    dataset: str,
    shots: int,
    seed: int,
    sampler: str,
    train: Samples,
    val: Samples | None,
    val_count: int,
) -> FewShotSplit | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        expected = {
            "version": SAMPLER_VERSION,
            "dataset": dataset,
            "sampler": sampler,
            "shots": shots,
            "seed": seed,
        }
        if any(record.get(key) != value for key, value in expected.items()):
            raise ValueError(f"it was written for { ({key: record.get(key) for key in expected}) }")
        split = FewShotSplit(
            train=[(str(p), int(label)) for p, label in record["train"]],
            val=None if record["val"] is None else [(str(p), int(label)) for p, label in record["val"]],
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        warnings.warn(f"Ignoring the unreadable few-shot cache {path} ({err}); sampling again.", stacklevel=3)
        return None
    reason = split_misfit(split, train, val, shots, sampler, val_count)
    if reason is not None:
        warnings.warn(
            f"Ignoring the few-shot cache {path}, which does not fit the dataset ({reason}); sampling again.",
            stacklevel=3,
        )
        return None
    return split


def _write_cache(path: Path, dataset: str, shots: int, seed: int, sampler: str, split: FewShotSplit) -> None:
    record = {
        "version": SAMPLER_VERSION,
        "dataset": dataset,
        "sampler": sampler,
        "shots": shots,
        "seed": seed,
        "train": split.train,
        "val": split.val,
    }
    # Processes that sample the same split at once (DDP ranks) never see half a file.
    write_text_atomic(path, json.dumps(record, indent=1, allow_nan=False))


def base_new_labels(num_classes: int, subsample: str) -> list[int]:
    """The original labels kept by `subsample`: `all`, `base` (the first ceil(n/2)) or `new` (the rest)."""
    if subsample not in SUBSAMPLE_CHOICES:
        raise ConfigError(f"subsample must be one of {', '.join(SUBSAMPLE_CHOICES)}, got {subsample!r}.")
    base_count = math.ceil(num_classes / 2)
    if subsample == "base":
        return list(range(base_count))
    if subsample == "new":
        return list(range(base_count, num_classes))
    return list(range(num_classes))


def subsample_classes(
    samples: Sequence[tuple[str, int]], classnames: Sequence[str], subsample: str
) -> tuple[Samples, list[str]]:
    """Keep the classes of `subsample` and relabel them from 0, as CoOp's `subsample_classes`.

    Returns the kept samples (new labels) and their class names (index = new label). Apply it to
    every split with the same `classnames` so the labels agree; `all` returns the input unchanged.
    CoCoOp draws the shots on all classes first and subsamples afterwards; so does the DataModule.
    """
    kept = base_new_labels(len(classnames), subsample)
    new_label = {old: new for new, old in enumerate(kept)}
    kept_samples = [(str(path), new_label[int(label)]) for path, label in samples if int(label) in new_label]
    return kept_samples, [classnames[old] for old in kept]
