"""The protocols of the field as data options: test sets and their roles (source, base / new, shift,
cross), CoCoOp's class halves, and the checks of a DataModule's options (each error names its
``data.*`` key)."""

from __future__ import annotations

from collections.abc import Sequence

from kr_vlm.data.digits import DOMAINS as DIGIT_DOMAINS
from kr_vlm.data.fewshot import SUBSAMPLE_CHOICES, check_sampler
from kr_vlm.data.registry import BENCHMARK_PREFIX, DATASET_NAMES, IMAGENET_SHIFT_DATASETS, dataset_info
from kr_vlm.data.templates import TEMPLATE_KINDS
from kr_vlm.errors import ConfigError

# The digits domains other than `clean` play the part of ImageNet's shifted test sets.
DIGIT_SHIFT_SETS: tuple[str, ...] = tuple(f"digits_{domain}" for domain in DIGIT_DOMAINS if domain != "clean")
# The shifted versions of each source dataset (its classes, drawn or photographed otherwise): the test sets
# of the distribution-shift protocol. Any other extra test set is a cross-dataset target.
SHIFT_SETS: dict[str, tuple[str, ...]] = {"imagenet": IMAGENET_SHIFT_DATASETS, "digits": DIGIT_SHIFT_SETS}
# Every name `test_sets` takes: a dataset of the registry, or a digits domain.
TEST_SET_NAMES: tuple[str, ...] = (*DATASET_NAMES, *DIGIT_SHIFT_SETS)
# What a test set measures (see the module docstring); metrics.json's `test_roles` holds these strings.
TEST_ROLES: tuple[str, ...] = ("source", "base", "new", "shift", "cross")
# data.subsample: the few-shot module's class subsets, and CoCoOp's protocol in one run.
BASE_TO_NEW = "base_to_new"
SUBSAMPLES: tuple[str, ...] = (*SUBSAMPLE_CHOICES, BASE_TO_NEW)


def check_test_sets(test_sets: Sequence[str], source: str) -> list[str]:
    """`test_sets` as a list, or a `ConfigError` for an unknown name, a repeated one or the source itself."""
    names = list(test_sets)
    unknown = [name for name in names if name not in TEST_SET_NAMES and not name.startswith(BENCHMARK_PREFIX)]
    if unknown:
        raise ConfigError(
            f"Unknown test sets {unknown} in data.test_sets (data.shift_sets); known: "
            f"{', '.join(TEST_SET_NAMES)}."
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated or source in names:
        raise ConfigError(
            f"data.test_sets (data.shift_sets) names {repeated or [source]} "
            f"{'more than once' if repeated else 'although it is the source dataset, which is always tested'}: "
            "list each extra test set once."
        )
    return names


def check_data_options(
    dataset: str,
    *,
    shots: int,
    fraction: float | None,
    train_templates: str,
    eval_templates: str,
    subsample: str,
    sampler: str,
    batch_size: int,
    eval_batch_size: int,
    num_workers: int,
    val_shots: int | None,
    min_iterations_per_epoch: int,
) -> None:
    """Raise a `ConfigError` naming the ``data.*`` key of the first option of `FewShotDataModule` that is
    wrong (an unknown dataset name lists the known ones)."""
    info = dataset_info(dataset)
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise ConfigError(f"data.shots must be a whole number >= 0 (0 = zero-shot), got {shots!r}.")
    if fraction is not None and not (
        isinstance(fraction, int | float)
        and not isinstance(fraction, bool)
        and 0 < fraction <= 1
        and shots > 0
    ):
        raise ConfigError(
            f"data.fraction must be a number in (0, 1] (aTLAS's data ratio, e.g. 0.5), with data.shots > 0 "
            f"(0 means zero-shot); got fraction={fraction!r}, shots={shots!r}."
        )
    if shots > 0 and "train" not in info.splits:
        raise ConfigError(
            f"{dataset!r} is an evaluation-only set (splits {list(info.splits)}): it cannot be trained "
            "on. Use data.shots=0, or train on its source (e.g. imagenet) with DistributionShiftDataModule."
        )
    for argument, kind in (("train_templates", train_templates), ("eval_templates", eval_templates)):
        if kind not in TEMPLATE_KINDS:
            raise ConfigError(f"data.{argument} must be one of {', '.join(TEMPLATE_KINDS)}, got {kind!r}.")
    if subsample not in SUBSAMPLES:
        raise ConfigError(f"data.subsample must be one of {', '.join(SUBSAMPLES)}, got {subsample!r}.")
    check_sampler(sampler)
    for argument, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if value < 1:
            raise ConfigError(f"data.{argument} must be at least 1, got {value}.")
    if num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}.")
    if val_shots is not None and (type(val_shots) is not int or val_shots < 1):
        raise ConfigError(
            "data.val_shots must be a whole number >= 1 (validation images per class), or null for "
            f"min(data.shots, 4), got {val_shots!r}."
        )
    if type(min_iterations_per_epoch) is not int or min_iterations_per_epoch < 0:
        raise ConfigError(
            "data.min_iterations_per_epoch must be a whole number >= 0 (the KRAdapter / RandLoRA authors: "
            f"10; 0 = every shot once an epoch), got {min_iterations_per_epoch!r}."
        )
