"""The Lightning DataModule of few-shot training on one dataset (and its protocols' test sets).

The contract with the model side:

- every constructor argument is plain (a Hydra config instantiates the module);
- the caller hands in the model's transforms with `dm.set_transforms(train_transform,
  eval_transform)` (before or after `setup()`; the data room knows nothing of models);
- after `setup()` (any stage) the module exposes `train_task`, `val_tasks` and `test_tasks`
  (`ClassificationTask`s: class names and prompt templates), where `val_tasks[i]` / `test_tasks[i]`
  describe the loader `val_dataloader()[i]` / `test_dataloader()[i]`; the loader methods always
  return lists, even of one;
- `test_roles` says what each test set measures, by task name (one of `kr_vlm.data.protocols.TEST_ROLES`): `source` (the
  training dataset, all its classes), `base` / `new` (its two halves, base-to-new), `shift` (a
  shifted version of the source: the same classes, drawn or photographed otherwise), `cross` (another
  dataset: cross-dataset transfer). The run summary writes them in metrics.json, and
  `kr_vlm.results` builds each protocol's table from them;
- `batch_size` is the global training batch: under DDP each process loads
  `batch_size / world_size` of it (`per_device_batch_size`), so the recipe does not change with the
  number of devices;
- batches are `(images, labels)`; labels index the class names of the loader's task;
- `shots=0` is zero-shot: nothing is sampled and `train_dataloader()` is an error.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from kr_vlm.data.atlas import atlas_fraction
from kr_vlm.data.base import ClassificationTask, DatasetNotFoundError, ImageListDataset, check_images_present
from kr_vlm.data.fewshot import (
    base_new_labels,
    few_shot_split,
    subsample_classes,
)
from kr_vlm.data.loading import ResumableLoader, SeededAugmentations, SeededShuffle, shot_repeats
from kr_vlm.data.protocols import (
    BASE_TO_NEW,
    DIGIT_SHIFT_SETS,
    SHIFT_SETS,
    check_data_options,
    check_test_sets,
)
from kr_vlm.data.registry import (
    BENCHMARK_PREFIX,
    build_dataset,
    dataset_folder,
    dataset_info,
    download_dataset,
)
from kr_vlm.data.templates import get_templates
from kr_vlm.errors import ConfigError

log = logging.getLogger(__name__)

Transform = Callable[[Any], Any]


def _few(items: Sequence[str], shown: int) -> str:
    """The first `shown` of `items` for a log line, and how many there are in all."""
    head = ", ".join(repr(item) for item in items[:shown])
    return f"[{head}{f', ... ({len(items)} in all)' if len(items) > shown else ''}]"


def _templates(dataset: ImageListDataset, name: str, kind: str) -> tuple[str, ...]:
    """The templates of `kind` for dataset `name`; CLIP_benchmark's are those its data came with, if any."""
    if kind == "clip_benchmark" and dataset.templates:
        return dataset.templates
    return get_templates(name, kind)


class FewShotDataModule(LightningDataModule):
    """Few-shot training on one dataset as in CoOp / CLIP-LoRA; validation and test on the same dataset,
    and tests on any further datasets (`test_sets`).

    Training uses `shots` images per class drawn with `seed` by `sampler` (`kr_vlm.data.fewshot`),
    validation min(`shots`, 4) per class of the val split (`val_shots` to validate on more), testing the
    whole test split. With
    `shots=0` nothing is drawn: there is no training loader and validation uses the whole val split.

    The protocols of the field are options of this module: `subsample="base_to_new"` (CoCoOp's
    base-to-new generalisation: train on the base half of the classes, test on both halves) and
    `test_sets` (cross-dataset transfer; distribution shift, for which `DistributionShiftDataModule`
    picks the shifted sets of the source).

    ImageNet's val folder is its test set (`DatasetInfo.val_is_test`), so its validation shots are
    drawn from its train folders, disjoint from the training shots, as CLIP-LoRA does; only
    `sampler="coop"` validates on the whole test set, as CoOp does (then `test_ckpt=best` selects on
    test images, which is CoOp's protocol and nobody else's).

    Args:
        dataset: a name of `kr_vlm.data.registry.DATASET_NAMES` (e.g. ``oxford_pets``, ``cifar10``,
            ``digits``), or ``clip_benchmark/<name>`` (`kr_vlm.data.clip_benchmark`).
        root: the data root, a CoOp-style `$DATA` folder (ignored by `digits`).
        shots: training images per class; 0 for zero-shot evaluation.
        seed: the few-shot sampling seed. It also seeds the training loader's shuffling (see
            `train_dataloader`).
        batch_size: the global training batch (CLIP-LoRA: 32): under DDP each process loads
            `batch_size / world_size` images a step (`per_device_batch_size`).
        min_iterations_per_epoch: repeat the shots within each epoch until it has at least this many
            optimiser steps (`kr_vlm.data.loading.shot_repeats`; the KRAdapter / RandLoRA authors: 10);
            0: every shot once an epoch. See `train_dataloader`.
        eval_batch_size: validation and test batch size of each process.
        val_shots: validation images per class, drawn from the val split (disjoint from the training
            shots and the test split; ImageNet: from the training images the shots left); None:
            min(`shots`, 4), as CoOp and CLIP-LoRA. Four a class cannot tell learning rates apart
            (one image is several points of accuracy); choosing a rate on the validation top-1 needs
            more, e.g. 16. Ignored at `shots=0`, which validates on the whole val split.
        num_workers: DataLoader worker processes.
        train_templates: template kind of `train_task` (`kr_vlm.data.templates.TEMPLATE_KINDS`;
            CLIP-LoRA trains with the simple ``"a photo of a {}."``).
        eval_templates: template kind of the validation and test tasks; every test set gets the
            templates of its own dataset.
        subsample: `all`, or CoOp's base-to-new classes: `base` keeps the first ceil(n/2) classes,
            `new` the others, relabelled from 0 (the split is sampled on all classes first, as CoOp);
            the task name then gets the suffix ``_base`` or ``_new``. `base_to_new` trains and
            validates on `base` and tests on both halves, as the test sets ``<dataset>_base`` and
            ``<dataset>_new``, each with its own class names.
        test_sets: further test sets, tested after the source's test split, each with its own class
            names and templates: registry names (``dtd``, ``imagenet_a``) or digits domains
            (``digits_rotated``). A set that is not under `root` is skipped, with one warning that
            lists every skipped set.
        skip_corrupt: skip unreadable images instead of failing (see `ImageListDataset`).
        sampler: the few-shot draw: `kr_vlm` (portable, the default), `coop` (CoOp's draw, image
            for image; CoOp's `split_fewshot/*.pkl` in the dataset folder are used as they are),
            `clip_lora` (CLIP-LoRA's draw) or `atlas` (aTLAS's / RandLoRA's draw, `kr_vlm.data.atlas`).
        fraction: train on this fraction of the training split instead of `shots` images per class
            (aTLAS's data-ratio runs, 0.5 or 1.0), drawn as RandLoRA draws it whatever the sampler
            (`kr_vlm.data.atlas.atlas_fraction`); validation uses the whole val split. None: few-shot.
        classnames: `default` (the dataset's own) or `clip_benchmark` (CLIP_benchmark's), for every set.
        download: let `prepare_data` fetch datasets that can be fetched (torchvision's, CLIP_benchmark's).
        pin_memory: pin batches in page-locked memory; None: only when CUDA is available.
        persistent_workers: keep the worker processes of the training and validation loaders alive
            between epochs. A few-shot epoch is short (16 shots x 37 classes / 32 = 19 batches), so
            starting the workers again every epoch would cost more than the epoch.
    """

    def __init__(
        self,
        dataset: str,
        root: str | Path = "data",
        shots: int = 16,
        seed: int = 1,
        batch_size: int = 32,
        eval_batch_size: int = 256,
        num_workers: int = 4,
        train_templates: str = "simple",
        eval_templates: str = "simple",
        subsample: str = "all",
        skip_corrupt: bool = False,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        sampler: str = "kr_vlm",
        test_sets: Sequence[str] | None = None,
        min_iterations_per_epoch: int = 0,
        fraction: float | None = None,
        classnames: str = "default",
        download: bool = False,
        val_shots: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        # Hydra hands lists over as omegaconf ListConfigs; checkpoints keep these hyperparameters and are
        # read back with weights_only=True, which takes plain Python data only.
        for key, value in self.hparams.items():
            if isinstance(value, Sequence) and not isinstance(value, str):
                self.hparams[key] = list(value)
        check_data_options(
            dataset,
            shots=shots,
            fraction=fraction,
            train_templates=train_templates,
            eval_templates=eval_templates,
            subsample=subsample,
            sampler=sampler,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            val_shots=val_shots,
            min_iterations_per_epoch=min_iterations_per_epoch,
        )

        self.dataset = dataset
        self.root = root
        self.shots = shots
        self.seed = seed
        self.batch_size = batch_size
        self.min_iterations_per_epoch = min_iterations_per_epoch
        self.val_shots = val_shots
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.train_templates = train_templates
        self.eval_templates = eval_templates
        self.subsample = subsample
        self.skip_corrupt = skip_corrupt
        self.sampler = sampler
        self.fraction = fraction
        self.classnames = classnames
        self.download = download
        self.test_sets: list[str] = check_test_sets(test_sets or (), dataset)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers
        # One generator for the whole fit: every epoch draws its order and augmentation seeds from it; the
        # training loader's state in a checkpoint brings it back (see `train_dataloader`).
        self._shuffle_generator = torch.Generator().manual_seed(seed)

        self.train_transform: Transform | None = None
        self.eval_transform: Transform | None = None
        # Filled by setup():
        self.train_task: ClassificationTask | None = None
        self.val_tasks: list[ClassificationTask] = []
        self.test_tasks: list[ClassificationTask] = []
        self.train_dataset: ImageListDataset | None = None
        self.val_datasets: list[ImageListDataset] = []
        self.test_datasets: list[ImageListDataset] = []
        self.test_roles: dict[str, str] = {}
        self._is_set_up = False

    @property
    def trained_classes(self) -> str:
        """The classes trained and validated on: `all`, `base` or `new` (`base_to_new` trains on `base`)."""
        return "base" if self.subsample == BASE_TO_NEW else self.subsample

    @property
    def task_name(self) -> str:
        """The name of the training task: the dataset name, with ``_base`` / ``_new`` for a subsample."""
        return self._subsample_name(self.trained_classes)

    def _subsample_name(self, subsample: str) -> str:
        return self.dataset if subsample == "all" else f"{self.dataset}_{subsample}"

    def set_transforms(self, train_transform: Transform | None, eval_transform: Transform | None) -> None:
        """Set the image transforms: `train_transform` for training, `eval_transform` for val and test.

        Call it with the model's preprocessing (e.g. from `kr_vlm.models.load_clip`) before the
        loaders are used; calling it after `setup()` updates the existing datasets.
        """
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self._apply_transforms()

    def setup(self, stage: str | None = None) -> None:
        """Read the file lists, draw the few-shot split and build every task, for any `stage`.

        Everything is built on the first call whatever the stage (so the tasks exist after
        `setup("fit")` as after `setup("test")`); later calls return at once. Images are opened
        lazily by the loaders, so this lists files but decodes none.
        """
        if self._is_set_up:
            return
        # The test split comes first: it exists for every dataset, and a missing source set is an error here.
        source_test = self._read(self.dataset, "test")
        classnames = list(source_test.classnames)

        info = dataset_info(self.dataset)
        # A val split that is the test set (ImageNet) or a part of the training split (aTLAS's held-out
        # images) is never drawn from: see the class docstring.
        own_val = "val" in info.splits and not (info.val_is_test or info.val_in_train)
        if self.fraction is not None:
            source_train = self._read(self.dataset, "train")
            train_samples = atlas_fraction(source_train.samples, self.fraction, self.seed)
            source_val = self._read(self.dataset, "val") if "val" in info.splits else None
            val_samples = source_val.samples if source_val is not None else []
        elif self.shots > 0:
            source_train = self._read(self.dataset, "train")
            source_val = self._read(self.dataset, "val") if own_val else None
            split = few_shot_split(
                self.dataset,
                source_train.samples,
                None if source_val is None else source_val.samples,
                self.shots,
                self.seed,
                classnames=classnames,
                sampler=self.sampler,
                dataset_dir=dataset_folder(self.dataset, self.root),
                val_shots=self.val_shots,
            )
            train_samples = split.train
            if split.val is None:  # CoOp's ImageNet: validate on the test set
                source_val, val_samples = source_test, source_test.samples
            else:
                source_val, val_samples = (source_train if source_val is None else source_val), split.val
        else:
            # Zero-shot: nothing to sample; validation (if the dataset has a val split) uses all of it.
            source_train, train_samples = None, []
            has_val = "val" in info.splits
            source_val = self._read(self.dataset, "val") if has_val else None
            val_samples = source_val.samples if source_val is not None else []
        templates = {
            kind: _templates(source_test, self.dataset, kind)
            for kind in (self.train_templates, self.eval_templates)
        }

        def subsampled(
            dataset: ImageListDataset, samples: list[tuple[str, int]], subsample: str, split: str
        ) -> tuple[ClassificationTask, ImageListDataset]:
            """The evaluation task and the dataset of `samples` restricted to the classes of `subsample`."""
            kept, kept_names = subsample_classes(samples, classnames, subsample)
            name = self._subsample_name(subsample)
            task = ClassificationTask(name, kept_names, templates[self.eval_templates])
            return task, dataset.with_samples(kept, kept_names, f"{name}/{split}")

        trained = self.trained_classes
        trained_names = [classnames[label] for label in base_new_labels(len(classnames), trained)]
        self.train_task = ClassificationTask(self.task_name, trained_names, templates[self.train_templates])
        if source_train is not None:
            _, self.train_dataset = subsampled(source_train, train_samples, trained, "train")
        if source_val is not None:
            val_task, val_dataset = subsampled(source_val, val_samples, trained, "val")
            self.val_tasks, self.val_datasets = [val_task], [val_dataset]
        # The source's test split: all classes, one half, or both halves (base-to-new) as two test sets.
        tested = ("base", "new") if self.subsample == BASE_TO_NEW else (trained,)
        for subsample in tested:
            task, dataset = subsampled(source_test, source_test.samples, subsample, "test")
            self._add_test_set(task, dataset, "source" if subsample == "all" else subsample)
        self._add_extra_test_sets()
        used = [self.train_dataset] if self.train_dataset is not None else []
        check_images_present([*used, *self.val_datasets, *self.test_datasets], self.skip_corrupt)

        self._apply_transforms()
        self._is_set_up = True
        train = "zero-shot" if self.train_dataset is None else f"{len(self.train_dataset)} training images"
        tests = {task.name: len(data) for task, data in zip(self.test_tasks, self.test_datasets, strict=True)}
        val_sizes = [len(data) for data in self.val_datasets]
        log.info("%s: %s, val %s, test %s", self.task_name, train, val_sizes, tests)
        for task in (self.train_task, *self.test_tasks):
            log.info(
                "%s: class names %s; templates %s",
                task.name,
                _few(task.classnames, 12),
                _few(task.templates, 3),
            )

    def _add_test_set(self, task: ClassificationTask, dataset: ImageListDataset, role: str) -> None:
        self.test_tasks.append(task)
        self.test_datasets.append(dataset)
        self.test_roles[task.name] = role

    def _add_extra_test_sets(self) -> None:
        """Append the test split of every set of `test_sets` found under `root`, with its own class names
        and templates; warn once about those not found."""
        missing: list[str] = []
        for name in self.test_sets:
            try:
                dataset, template_source = self._build_test_set(name)
            except DatasetNotFoundError as err:
                missing.append(name)
                log.info("Test set %s not found: %s", name, err)
                continue
            task = ClassificationTask(
                name, dataset.classnames, _templates(dataset, template_source, self.eval_templates)
            )
            self._add_test_set(
                task, dataset, "shift" if name in SHIFT_SETS.get(self.dataset, ()) else "cross"
            )
        if missing:
            warnings.warn(
                f"Skipping the test sets not found under {self.root}: {', '.join(missing)}. "
                "See data/README.md for where each one goes.",
                UserWarning,
                stacklevel=3,
            )

    def _build_test_set(self, name: str) -> tuple[ImageListDataset, str]:
        """The test split of test set `name`, and the dataset whose templates it uses."""
        if name in DIGIT_SHIFT_SETS:
            domain = name.removeprefix("digits_")
            return build_dataset("digits", self.root, "test", domain=domain), "digits"
        return self._read(name, "test"), name

    def _read(self, name: str, split: str) -> ImageListDataset:
        """Split `split` of dataset `name` under `root`, with this module's reading options."""
        return build_dataset(name, self.root, split, **self._read_options(name))

    def _read_options(self, name: str) -> dict[str, Any]:
        options = {"skip_corrupt": self.skip_corrupt, "classnames": self.classnames}
        if name.startswith(BENCHMARK_PREFIX):  # CLIP_benchmark fetches its datasets as it reads them
            options.update(download=self.download, dataset_root=getattr(self, "dataset_root", None))
        return options

    def prepare_data(self) -> None:
        """With `download`, fetch the source and test sets that can be fetched and are not there yet
        (torchvision's datasets; CLIP_benchmark's fetch themselves when read)."""
        if self.download:
            for name in (self.dataset, *self.test_sets):
                if name not in DIGIT_SHIFT_SETS:
                    download_dataset(name, self.root)

    def _apply_transforms(self) -> None:
        if self.train_dataset is not None:
            self.train_dataset.transform = self.train_transform
        for dataset in self.val_datasets + self.test_datasets:
            dataset.transform = self.eval_transform

    def _ready_for_loading(self, transform: Transform | None, which: str) -> None:
        self.setup()
        if transform is None:
            raise RuntimeError(
                f"No {which} transform: call datamodule.set_transforms(train_transform, eval_transform) with "
                "the model's preprocessing before asking for loaders."
            )

    def train_dataloader(self) -> ResumableLoader:
        """The few-shot training loader: shuffled, batches of `per_device_batch_size()` (all of
        `batch_size` on one device), the last one possibly smaller.

        A `torchdata` `StatefulDataLoader` (`kr_vlm.data.loading`), whose state Lightning keeps in
        every checkpoint: a fit resumed from any step, mid-epoch included, continues with the batches
        the uninterrupted fit would have loaded, with or without workers. The order of each epoch and
        one augmentation seed a sample come from a `torch.Generator` seeded with `seed` and kept for
        the whole fit, so the batches depend only on the few-shot seed (not on how many random numbers
        model construction drew, nor on `num_workers`). `drop_last` is False as in CLIP-LoRA: a small
        few-shot set (1 shot x 10 classes) is smaller than one batch and would yield no batch at all.

        With `min_iterations_per_epoch`, an epoch goes through the shots `shot_repeats()` times, in one
        shuffle of all the copies, each copy augmented under its own seed.
        """
        if self.shots == 0:
            raise RuntimeError(
                f"{self.dataset} is set up for zero-shot evaluation (shots=0): there is no training split. "
                "Set data.shots to 1 or more to train."
            )
        self._ready_for_loading(self.train_transform, "training")
        repeats = self.shot_repeats()
        epoch: Dataset = self.train_dataset if repeats == 1 else ConcatDataset([self.train_dataset] * repeats)
        if repeats > 1:
            log.info(
                "An epoch goes %d times through the training images (data.min_iterations_per_epoch).", repeats
            )
        return ResumableLoader(
            SeededAugmentations(epoch),
            batch_size=self.per_device_batch_size(),
            sampler=SeededShuffle(len(epoch), self._shuffle_generator),
            # The workers' base seeds, which nothing draws from, come from a generator of their own: from
            # torch's global one they would shift dropout's draws, from the shuffle generator the epochs'.
            generator=torch.Generator().manual_seed(self.seed),
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def shot_repeats(self) -> int:
        """How many times a training epoch goes through the shots (`kr_vlm.data.loading.shot_repeats`), so
        that it has at least `min_iterations_per_epoch` optimiser steps: steps of `batch_size` images
        times the attached trainer's `accumulate_grad_batches`, so that accumulating gradients over
        smaller batches repeats the shots as the whole batch would."""
        if not self.min_iterations_per_epoch:
            return 1
        self.setup()
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        return shot_repeats(
            len(self.train_dataset), self.batch_size * accumulate, self.min_iterations_per_epoch
        )

    def per_device_batch_size(self) -> int:
        """The training batch of one process: `batch_size` (the global batch) over the world size of the
        trainer the module is attached to (1 when it is attached to none).

        So `trainer=ddp` on N devices trains the schedule of one device: the same images a step, the
        same `max_steps`. A global batch that does not divide evenly is an error.
        """
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world_size:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is the global batch of a training step and must divide "
                f"evenly over the {world_size} processes of the trainer (trainer.devices x "
                f"trainer.num_nodes): set data.batch_size to a multiple of {world_size}, or change "
                "trainer.devices."
            )
        return self.batch_size // world_size

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per entry of `val_tasks`, in order (not shuffled)."""
        self._ready_for_loading(self.eval_transform, "evaluation")
        return [self._eval_loader(dataset, self.persistent_workers) for dataset in self.val_datasets]

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per entry of `test_tasks`, in order (not shuffled; workers end with each pass)."""
        self._ready_for_loading(self.eval_transform, "evaluation")
        return [self._eval_loader(dataset, persistent=False) for dataset in self.test_datasets]

    def _eval_loader(self, dataset: ImageListDataset, persistent: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=persistent and self.num_workers > 0,
        )
