"""The training loader: resumable at any step, drawing the same augmentations whatever loads a sample.

Lightning 2.6 saves the state of a `torchdata.stateful_dataloader.StatefulDataLoader` in every
checkpoint (the fit loop's ``combined_loader`` entry) and loads it back when a fit resumes: how far
into the epoch the loader was, its sampler's state, and a snapshot of each worker's dataset state.
It does not bring back the random generators inside the worker processes, which the random
augmentations draw from: a resumed run starts new workers, seeded afresh, so every crop after the
resume would differ from the uninterrupted run's (and with persistent workers those generators
carry on across epochs). So no augmentation draws from a worker's generators: `SeededShuffle`
draws, with each epoch's order, one seed a sample, and `SeededAugmentations` loads and transforms
each sample under its own seed. Everything a batch holds is then a function of the shuffle
generator's state at the start of the epoch, which the sampler's state keeps: a resumed fit, at any
step, mid-epoch included, loads the batches the uninterrupted fit loads, with any number of workers.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from kr_vlm.errors import ConfigError

# Seeds are drawn below 2**63 (torch's and Python's generators take them whole).
_SEED_BOUND = 2**63 - 1


class SeededShuffle(Sampler[tuple[int, int]]):
    """Each epoch, a random order of ``range(size)`` with a random seed for each index: ``(index, seed)``.

    Both are drawn from ``generator`` when an epoch's first item is taken. The epoch's iterator is
    stateful: its ``state_dict`` (the generator's state at the start of the epoch and how many items
    it yielded) is what `StatefulDataLoader` saves, and loading it draws the same epoch again and
    continues after the items already yielded, leaving the generator where the epoch left it.
    """

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size = size
        self.generator = generator

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return _SeededEpoch(self.size, self.generator)


class _SeededEpoch(Iterator[tuple[int, int]]):
    """One epoch of `SeededShuffle` (torchdata's Stateful protocol).

    It draws at its first item, not when made: torch's multiprocessing loader makes two iterators
    of its sampler on its first pass and uses the second, and an eager draw in the first would
    advance the generator only when the loader has workers.
    """

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self._size = size
        self._generator = generator
        self._start_state: torch.Tensor | None = None
        self._order: list[int] = []
        self._seeds: list[int] = []
        self._yielded = 0

    def _draw(self, start_state: torch.Tensor) -> None:
        self._start_state = start_state
        self._generator.set_state(start_state)
        self._order = torch.randperm(self._size, generator=self._generator).tolist()
        self._seeds = torch.randint(_SEED_BOUND, (self._size,), generator=self._generator).tolist()

    def __next__(self) -> tuple[int, int]:
        if self._start_state is None:
            self._draw(self._generator.get_state())
        if self._yielded == self._size:
            raise StopIteration
        item = self._order[self._yielded], self._seeds[self._yielded]
        self._yielded += 1
        return item

    def state_dict(self) -> dict[str, Any]:
        start = self._generator.get_state() if self._start_state is None else self._start_state
        return {"generator": start, "yielded": self._yielded}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._draw(state_dict["generator"])
        self._yielded = state_dict["yielded"]


def shot_repeats(num_images: int, batch_size: int, min_iterations: int) -> int:
    """How many times an epoch goes through ``num_images`` training images so that it has at least
    ``min_iterations`` batches of ``batch_size``.

    1 when one pass already has that many (or ``min_iterations`` is 0). Otherwise the KRAdapter / RandLoRA
    authors' rule (``vision_language/src/finetune.py``: with ``r = len(shots) / batch_size < 10`` the shots
    are repeated ``int(10 / r) + 1`` times), ``floor(min_iterations * batch_size / num_images) + 1``: the
    epoch then has more than ``min_iterations`` batches (11 for one batch of shots and 10 asked).
    """
    if min_iterations <= 0 or num_images >= min_iterations * batch_size:
        return 1
    return min_iterations * batch_size // num_images + 1


class SeededAugmentations(Dataset):
    """``dataset[index]`` for the ``(index, seed)`` items of `SeededShuffle`, loaded under ``seed``.

    torch's and Python's global generators (the ones torchvision's and open_clip's random transforms
    draw from) are seeded with ``seed`` while the sample is loaded and transformed, and put back
    afterwards: without workers, the training process's generators (dropout) are untouched. NumPy's
    global generator is left alone (none of those transforms draws from it; seeding and restoring it
    would cost more than the rest together).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        torch_state, python_state = torch.get_rng_state(), random.getstate()
        # torch.manual_seed would also seed every accelerator's generators, at a hundred times the cost.
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(python_state)


def _saved_num_workers(state_dict: dict[str, Any]) -> int:
    """The ``num_workers`` of the loader that wrote ``state_dict`` (a StatefulDataLoader state)."""
    snapshot = state_dict.get("_snapshot")
    return snapshot["_main_snapshot"]["_num_workers"] if snapshot else 0


def _batches_yielded(state_dict: dict[str, Any]) -> int:
    """How many batches of its epoch the loader that wrote ``state_dict`` had yielded."""
    snapshot = state_dict.get("_snapshot")
    if snapshot:
        return snapshot["_snapshot_step"] + state_dict["_steps_since_snapshot"]
    return state_dict["_num_yielded"]


class ResumableLoader(StatefulDataLoader):
    """A `StatefulDataLoader` that resumes a state saved after the last batch of an epoch with the
    next epoch, and says which setting to change when a state cannot be resumed.

    Lightning saves a checkpoint after a batch, and knows the epoch's length, so a state saved after
    the last batch still has an epoch to finish: torchdata would resume it as an empty epoch, which
    Lightning counts (one epoch more than the uninterrupted run). The state of a loader with workers
    holds one snapshot a worker: torchdata fails on another count with a bare assertion.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            # torchdata 0.11 calls a torch function that this torch deprecates: noise for users.
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            super().__init__(*args, **kwargs)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict and _saved_num_workers(state_dict) != self.num_workers:
            raise ConfigError(
                f"The checkpoint was written by a run with data.num_workers={_saved_num_workers(state_dict)}, "
                f"and this run has data.num_workers={self.num_workers}: the loader's position cannot move "
                f"between them. Resume with data.num_workers={_saved_num_workers(state_dict)}."
            )
        if state_dict and _batches_yielded(state_dict) == len(self):
            state_dict = {**state_dict, "_iterator_finished": True}
        super().load_state_dict(state_dict)
