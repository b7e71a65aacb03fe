"""Few-shot splits as CoOp samples them, cached as small JSON files, and CoOp's base-to-new split.

CoOp (KaiyangZhou/CoOp, `datasets/oxford_pets.py`) and Dassl (`DatasetBase.generate_fewshot_dataset`)
draw K training images per class with `random.sample` (`random.choices` when a class has fewer than
K) and min(K, 4) validation images per class, then cache the result per shots and seed. kr_vlm
does the same with two changes that make a split reproducible on any machine:

- each class's samples are sorted by path before drawing, so the order in which a file system lists
  a folder never matters, and
- the draws come from a local `random.Random(seed)`, never from the global random state.

A cached split is keyed by dataset, shots, seed and a hash of the source file lists, so a changed
dataset (a file added, removed or relabelled) gets a fresh split instead of a stale one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kr_vlm.files import write_text_atomic

log = logging.getLogger(__name__)

Samples = list[tuple[str, int]]

# Stored in every cache file; bump it when the sampling changes so old caches are not reused.
SAMPLER_VERSION = 1
SUBSAMPLE_CHOICES = ("all", "base", "new")


@dataclass(frozen=True)
class FewShotSplit:
    """The sampled training and validation samples, `(path, label)` pairs grouped by label."""

    train: Samples
    val: Samples


def validation_shots(shots: int) -> int:
    """Validation images per class for a `shots`-shot split: min(shots, 4), as CoOp."""
    return min(shots, 4)


def group_by_label(samples: Sequence[tuple[str, int]]) -> dict[int, Samples]:
    """The samples of each label, labels in increasing order, each class sorted by path."""
    groups: dict[int, Samples] = defaultdict(list)
    for path, label in samples:
        groups[int(label)].append((str(path), int(label)))
    return {label: sorted(groups[label]) for label in sorted(groups)}


def sample_per_class(samples: Sequence[tuple[str, int]], shots: int, rng: random.Random) -> Samples:
    """Draw `shots` samples of every label present in `samples`, using `rng`.

    Without replacement (`rng.sample`) where a class has at least `shots` samples, with replacement
    (`rng.choices`, as CoOp's `repeat=True`) where it has fewer. Classes are visited in label order
    and each class's samples are sorted first, so the result depends only on the set of samples and
    the state of `rng`.
    """
    if shots < 1:
        raise ValueError(f"shots must be at least 1 to sample a few-shot split, got {shots}.")
    sampled: Samples = []
    for items in group_by_label(samples).values():
        if len(items) >= shots:
            sampled.extend(rng.sample(items, shots))
        else:
            sampled.extend(rng.choices(items, k=shots))
    return sampled


def source_hash(*sample_lists: Sequence[tuple[str, int]]) -> str:
    """A hash of the given sample lists that ignores their order (hex SHA-256).

    Any added, removed, renamed or relabelled file changes it; listing the same files in another
    order does not.
    """
    digest = hashlib.sha256()
    for samples in sample_lists:
        canonical = sorted((str(path), int(label)) for path, label in samples)
        digest.update(json.dumps(canonical, separators=(",", ":")).encode("utf-8"))
        digest.update(b"\x00")  # keeps ([a], [b]) apart from ([a, b], [])
    return digest.hexdigest()


def cache_path(cache_dir: str | Path, dataset: str, shots: int, seed: int, source_digest: str) -> Path:
    """Where the split of `dataset` with `shots` and `seed` for the given source hash is cached."""
    return Path(cache_dir) / dataset / f"shot_{shots}-seed_{seed}-{source_digest[:16]}.json"


def warn_short_classes(
    samples: Sequence[tuple[str, int]],
    shots: int,
    what: str,
    classnames: Sequence[str] | None = None,
) -> list[int]:
    """Warn (once, naming them) about the classes with fewer than `shots` samples; return their labels.

    With `classnames`, a class that has no sample at all is reported too (it cannot be sampled).
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
            f"{what}: {len(short)} classes have fewer than {shots} images; they are sampled with replacement "
            f"(as CoOp), and a class with 0 images gets none: {', '.join(described)}.",
            UserWarning,
            stacklevel=3,
        )
    return short


def few_shot_split(
    dataset: str,
    train_samples: Sequence[tuple[str, int]],
    val_samples: Sequence[tuple[str, int]],
    shots: int,
    seed: int,
    cache_dir: str | Path | None = None,
    classnames: Sequence[str] | None = None,
) -> FewShotSplit:
    """Sample `shots` training and min(`shots`, 4) validation images per class, as CoOp does.

    Args:
        dataset: the dataset name; part of the cache key and of messages.
        train_samples: the full training split, `(path, label)` pairs, in any order.
        val_samples: the full validation split, in any order.
        shots: images per class to train on (at least 1).
        seed: the sampling seed (CoOp and CLIP-LoRA report seeds 1, 2, 3). Training samples are
            drawn first, then validation samples, from one `random.Random(seed)`.
        cache_dir: if given, the split is read from / written to a JSON file under it (see
            `cache_path`); None samples afresh every time (the result is the same).
        classnames: used to name the classes in the warning about classes with too few images.

    Returns:
        a `FewShotSplit`; within each list the samples are grouped by increasing label.
    """
    if shots < 1:
        raise ValueError(f"shots must be at least 1 for a few-shot split, got {shots} (0 means zero-shot).")
    # The warnings come from the source lists, so they also appear when the split is read from the cache.
    warn_short_classes(train_samples, shots, f"{dataset} train", classnames)
    warn_short_classes(val_samples, validation_shots(shots), f"{dataset} val", classnames)

    path = None
    if cache_dir is not None:
        path = cache_path(cache_dir, dataset, shots, seed, source_hash(train_samples, val_samples))
        cached = _read_cache(path, dataset, shots, seed)
        if cached is not None:
            log.info("Read the %d-shot split of %s (seed %d) from %s", shots, dataset, seed, path)
            return cached

    rng = random.Random(seed)
    split = FewShotSplit(
        train=sample_per_class(train_samples, shots, rng),
        val=sample_per_class(val_samples, validation_shots(shots), rng),
    )
    if path is not None:
        _write_cache(path, dataset, shots, seed, split)
        log.info("Wrote the %d-shot split of %s (seed %d) to %s", shots, dataset, seed, path)
    return split


def _read_cache(path: Path, dataset: str, shots: int, seed: int) -> FewShotSplit | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        expected = {"version": SAMPLER_VERSION, "dataset": dataset, "shots": shots, "seed": seed}
        if any(record.get(key) != value for key, value in expected.items()):
            raise ValueError(f"it was written for { ({key: record.get(key) for key in expected}) }")
        return FewShotSplit(
            train=[(str(p), int(label)) for p, label in record["train"]],
            val=[(str(p), int(label)) for p, label in record["val"]],
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        warnings.warn(f"Ignoring the unreadable few-shot cache {path} ({err}); sampling again.", stacklevel=3)
        return None


def _write_cache(path: Path, dataset: str, shots: int, seed: int, split: FewShotSplit) -> None:
    record = {
        "version": SAMPLER_VERSION,
        "dataset": dataset,
        "shots": shots,
        "seed": seed,
        "train": split.train,
        "val": split.val,
    }
    # Processes that sample the same split at once (DDP ranks) never see half a file.
    write_text_atomic(path, json.dumps(record, indent=1))


def base_new_labels(num_classes: int, subsample: str) -> list[int]:
    """The original labels kept by `subsample`: `all`, `base` (the first ceil(n/2)) or `new` (the rest)."""
    if subsample not in SUBSAMPLE_CHOICES:
        raise ValueError(f"subsample must be one of {', '.join(SUBSAMPLE_CHOICES)}, got {subsample!r}.")
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
    """
    kept = base_new_labels(len(classnames), subsample)
    new_label = {old: new for new, old in enumerate(kept)}
    kept_samples = [(str(path), new_label[int(label)]) for path, label in samples if int(label) in new_label]
    return kept_samples, [classnames[old] for old in kept]
