"""The distribution-shift protocol: few-shot training on a source dataset, tests on its shifted versions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kr_vlm.data.datamodules import FewShotDataModule
from kr_vlm.data.protocols import SHIFT_SETS
from kr_vlm.errors import ConfigError


class DistributionShiftDataModule(FewShotDataModule):
    """Few-shot training on a source dataset; test on its test split and on every shifted test set.

    The protocol of CoOp / CLIP-LoRA's domain-generalisation tables: train on few-shot ImageNet,
    test on ImageNet and on ImageNet-V2, -Sketch, -A and -R. It is `FewShotDataModule` with
    the shifted sets of the source (`SHIFT_SETS`) tested first: each gets its own loader and task,
    with its own class names (ImageNet-A and -R have 200 classes, labelled by their own folders) and
    templates. Offline, `dataset="digits"` trains on clean digits and tests on the other digits
    domains (`digits_inverted`, `digits_rotated`, `digits_noisy`, `digits_edges`).

    A shifted set that is not under `root` is skipped, with one warning that lists every skipped
    set; a missing source dataset is an error.

    Args:
        dataset: the source dataset (default `imagenet`).
        shift_sets: the shifted test sets, in order; None: all known for the source
            (`SHIFT_SETS`). Any name `FewShotDataModule`'s `test_sets` takes.
        test_sets: further test sets (cross-dataset targets), tested after the shifted sets.
        **kwargs: every other argument of `FewShotDataModule`, with its meaning and default.
    """

    def __init__(
        self,
        dataset: str = "imagenet",
        shift_sets: Sequence[str] | None = None,
        test_sets: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if shift_sets is None:
            if dataset not in SHIFT_SETS:
                raise ConfigError(
                    f"No shifted test sets are known for {dataset!r} (known for {', '.join(SHIFT_SETS)}); "
                    "name them with data.shift_sets=[...]."
                )
            shift_sets = SHIFT_SETS[dataset]
        self._shift_set_count = len(shift_sets)
        super().__init__(dataset=dataset, test_sets=[*shift_sets, *(test_sets or ())], **kwargs)

    @property
    def shift_sets(self) -> list[str]:
        """The shifted test sets (the first `test_sets` of this module)."""
        return self.test_sets[: self._shift_set_count]
