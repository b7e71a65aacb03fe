"""Exact resume with loader workers: a fit resumed from a checkpoint at an epoch boundary or in the
middle of an epoch ends with the adapters and test metrics of the uninterrupted fit, and a fit
resumed into its own folder continues its CSV log and its `last.ckpt`.

Runs use the tiny CLIP on clean digits with two persistent loader workers (the defaults' kind of
loader); 4 shots of 10 classes in batches of 8 make an epoch of 5 batches.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from safetensors.torch import load_file
from torchvision import transforms

from compose_helpers import TINY_MODEL, compose_config, run_state_restored
from kr_vlm import cli
from kr_vlm.data import FewShotDataModule
from kr_vlm.errors import ConfigError

BATCHES_PER_EPOCH = 5
RUN = (
    "experiment=demo",
    "data=digits",
    "data.shots=4",
    "data.batch_size=8",
    *TINY_MODEL,
    "trainer=cpu",
    "logger=csv",
    "~callbacks.rank_monitor",
    "~callbacks.progress_bar",
    "trainer.max_steps=12",
    "trainer.log_every_n_steps=1",
)
ADAPTER_WEIGHTS = Path("adapters") / "adapter_model.safetensors"


@pytest.fixture(autouse=True)
def _clear_hydra():
    with run_state_restored():
        yield


def run_train(tmp_path: Path, run_dir: Path, *overrides: str) -> dict:
    return cli.train(compose_config(tmp_path, [*RUN, *overrides, f"paths.output_dir={run_dir}"]))


def logged_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of the run's metrics.csv."""
    with (run_dir / "csv" / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def logged_steps(run_dir: Path) -> list[int]:
    """The steps of the training-loss rows of the run's metrics.csv."""
    return [int(row["step"]) for row in logged_rows(run_dir) if row["train/loss"]]


# The settings each resume case runs with; every run of a case keeps a checkpoint after every step.
WITH_WORKERS = ("data.num_workers=2",)
WITHOUT_WORKERS = ("data.num_workers=0",)
EVERY_STEP = ("callbacks.model_checkpoint.every_n_train_steps=1", "callbacks.model_checkpoint.save_top_k=-1")
# Validation every 3 steps, a checkpoint after each (as test_ckpt=best needs).
AFTER_VALIDATION = (
    "trainer.val_check_interval=3",
    "callbacks.model_checkpoint.monitor=val/top1",
    "callbacks.model_checkpoint.every_n_train_steps=null",
    "callbacks.model_checkpoint.save_top_k=-1",
)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """``straight_run(settings)``: the uninterrupted 12-step fit with these overrides, as ``(run folder,
    metrics)``; each is run once."""
    runs: dict[tuple[str, ...], tuple[Path, dict]] = {}

    def run(settings: tuple[str, ...]) -> tuple[Path, dict]:
        if settings not in runs:
            tmp_path = tmp_path_factory.mktemp("straight")
            with run_state_restored():
                metrics = run_train(tmp_path, tmp_path / "run", *settings)
            runs[settings] = tmp_path / "run", metrics
        return runs[settings]

    return run


def assert_same_adapters(got_dir: Path, expected_dir: Path) -> None:
    got, expected = load_file(got_dir / ADAPTER_WEIGHTS), load_file(expected_dir / ADAPTER_WEIGHTS)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.items())


@pytest.mark.parametrize(
    ("settings", "step"),
    [
        pytest.param((*WITH_WORKERS, *EVERY_STEP), BATCHES_PER_EPOCH, id="epoch_boundary"),
        pytest.param((*WITH_WORKERS, *EVERY_STEP), BATCHES_PER_EPOCH + 2, id="mid_epoch"),
        pytest.param((*WITHOUT_WORKERS, *EVERY_STEP), BATCHES_PER_EPOCH, id="epoch_boundary_no_workers"),
        # The KRAdapter authors' recipe: the caption loss, clipping, and the 40 shots in 2 copies an epoch
        # (at least 6 batches of 8: 10 an epoch), resumed in the middle of the first epoch.
        pytest.param(
            (
                *WITH_WORKERS,
                "model.loss=caption_contrastive",
                "trainer.gradient_clip_val=0.5",
                "data.min_iterations_per_epoch=6",
                *EVERY_STEP,
            ),
            7,
            id="mid_epoch_authors_recipe",
        ),
        pytest.param(
            (*WITH_WORKERS, "+data.persistent_workers=false", *EVERY_STEP),
            BATCHES_PER_EPOCH + 2,
            id="mid_epoch_fresh_workers",
            marks=pytest.mark.slow,
        ),
        pytest.param((*WITH_WORKERS, *AFTER_VALIDATION), 9, id="after_validation", marks=pytest.mark.slow),
        # LoRA's dropout draws from the training process's generator, which the checkpoint keeps.
        pytest.param(
            (*WITH_WORKERS, "adapter=lora", *EVERY_STEP),
            BATCHES_PER_EPOCH + 2,
            id="mid_epoch_dropout",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_resume_is_exact(straight_run, tmp_path, settings, step):
    straight_dir, straight = straight_run(settings)
    checkpoint = straight_dir / "checkpoints" / f"step_{step}.ckpt"
    resumed = run_train(tmp_path, tmp_path / "run", *settings, f"ckpt_path={checkpoint}")
    assert resumed["steps"] == 12
    assert_same_adapters(tmp_path / "run", straight_dir)
    assert resumed["test"] == straight["test"]  # losses included, to the last bit
    # Only the steps after the checkpoint ran, logging what the uninterrupted run logged: losses,
    # learning rates, epochs (a state saved after an epoch's last batch resumes with the next epoch).
    later = [row for row in logged_rows(straight_dir) if int(row["step"]) >= step]
    assert logged_rows(tmp_path / "run") == later and logged_steps(tmp_path / "run")[0] == step


def test_a_fit_does_not_depend_on_the_number_of_workers(straight_run):
    (with_workers, metrics) = straight_run((*WITH_WORKERS, *EVERY_STEP))
    (without, metrics_without) = straight_run((*WITHOUT_WORKERS, *EVERY_STEP))
    assert_same_adapters(with_workers, without)
    assert metrics["test"] == metrics_without["test"]


class StopAtStep(Callback):
    """Ends the fit with an error after `step` optimiser steps, as a crash would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"stopped at step {self.step}")


def test_resume_into_the_same_folder_continues_the_log_and_last_ckpt(straight_run, tmp_path):
    straight_dir, _ = straight_run((*WITH_WORKERS, *EVERY_STEP))
    run_dir = tmp_path / "run"
    # Checkpoints every 4 steps; the run dies at step 6, after writing step_4.ckpt and last.ckpt.
    every_4 = "callbacks.model_checkpoint.every_n_train_steps=4"
    with pytest.raises(RuntimeError, match="stopped at step 6"):
        run_train(
            tmp_path,
            run_dir,
            *WITH_WORKERS,
            every_4,
            "+callbacks.stop._target_=test_resume.StopAtStep",
            "+callbacks.stop.step=6",
        )
    checkpoints = run_dir / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["last.ckpt", "step_4.ckpt"]
    assert logged_steps(run_dir) == list(range(5))  # step 6 died before its row was logged

    run_train(tmp_path, run_dir, *WITH_WORKERS, every_4, f"ckpt_path={checkpoints / 'step_4.ckpt'}")
    assert_same_adapters(run_dir, straight_dir)
    # The log keeps steps 0-3 of the first run, then the resumed run's 4-11: the uninterrupted log.
    assert logged_rows(run_dir) == logged_rows(straight_dir)
    # last.ckpt moved on to the end of the run; no last-v1.ckpt beside it.
    assert sorted(path.name for path in checkpoints.iterdir()) == ["last.ckpt", "step_12.ckpt", "step_4.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 12


def test_resume_with_another_number_of_workers_says_which_to_use(straight_run, tmp_path):
    straight_dir, _ = straight_run((*WITH_WORKERS, *EVERY_STEP))
    with pytest.raises(ConfigError, match="data.num_workers=2"):
        run_train(
            tmp_path,
            tmp_path / "run",
            "data.num_workers=0",
            f"ckpt_path={straight_dir / 'checkpoints' / 'step_7.ckpt'}",
        )


def test_training_batches_do_not_depend_on_the_number_of_workers():
    """Each sample's augmentation has its own seed, drawn with the epoch's order."""

    def batches(num_workers: int) -> list[torch.Tensor]:
        datamodule = FewShotDataModule("digits", shots=4, batch_size=8, num_workers=num_workers)
        augment = transforms.Compose(
            [transforms.RandomResizedCrop(16, scale=(0.2, 1.0)), transforms.PILToTensor()]
        )
        datamodule.set_transforms(augment, augment)
        loader = datamodule.train_dataloader()
        return [images for _ in range(2) for images, _ in loader]

    without_workers = batches(0)
    assert len(without_workers) == 2 * BATCHES_PER_EPOCH
    assert not torch.equal(without_workers[0], without_workers[BATCHES_PER_EPOCH])  # epochs differ
    with_workers = batches(2)
    assert all(torch.equal(a, b) for a, b in zip(without_workers, with_workers, strict=True))
