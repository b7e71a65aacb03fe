"""A run folder records what was run: a schedule of no step is a zero-shot run (no adapters, tested
zero-shot), a resumed fit must keep the data, optimiser and schedule of its checkpoint (refused before
anything is built otherwise, every difference listed), and resuming a finished run changes nothing."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compose_helpers import QUICK, TINY_MODEL, compose_config, run_state_restored
from kr_vlm import cli
from kr_vlm.cli.resume import resume_differences
from kr_vlm.errors import ConfigError
from test_run_folder import digests

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clear_hydra():
    with run_state_restored():
        yield


def run_train(tmp_path: Path, *overrides: str, run: str = "run") -> dict:
    return cli.train(compose_config(tmp_path, [*QUICK, *overrides, f"paths.output_dir={tmp_path / run}"]))


@pytest.mark.parametrize("schedule", ["trainer.max_steps=0", "+trainer.limit_train_batches=0"])
def test_a_schedule_of_no_step_is_a_zero_shot_run(schedule, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        metrics = run_train(tmp_path, schedule)
    assert f"Nothing to train ({schedule.lstrip('+')})" in caplog.text
    assert metrics["tested"] == "zero-shot" and metrics["steps"] == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["tested"] == "zero-shot"
    assert not (tmp_path / "run" / "adapters").exists()
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_a_checkpoint_records_what_a_resumed_fit_must_keep(tmp_path):
    run_train(tmp_path, "trainer.max_steps=2")
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)

    def differences(*overrides: str) -> list[str]:
        return resume_differences(
            compose_config(tmp_path, [*QUICK, "trainer.max_steps=2", *overrides]), checkpoint
        )

    assert differences() == []
    assert differences("data.shots=2", "model.optimizer.lr=5e-4", "trainer.max_steps=4") == [
        "data.shots=1 (this run: 2)",
        "model.optimizer.lr=0.005 (this run: 0.0005)",
        "trainer.max_steps=2 (this run: 4)",
    ]
    assert differences("data.batch_size=8", "data.seed=3", "model.scheduler.min_lr=0") == [
        "data.seed=1 (this run: 3)",
        "data.batch_size=32 (this run: 8)",
        "model.scheduler.min_lr=1e-06 (this run: 0.0)",
    ]
    with pytest.raises(ConfigError, match=r"other settings than this one: data.shots=1 \(this run: 2\)"):
        run_train(
            tmp_path,
            "trainer.max_steps=2",
            "data.shots=2",
            f"ckpt_path={tmp_path / 'run/checkpoints/last.ckpt'}",
            run="resumed",
        )
    assert not (tmp_path / "resumed").exists()


# ------------------------------------------------------------------------------------ real command lines


def train_command(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The demo, shortened (tiny model, digits, 2 steps, a checkpoint after each), as a user types it."""
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "experiment=demo",
            "data=digits",
            "data.shots=1",
            *TINY_MODEL,
            "trainer=cpu",
            "~callbacks.rank_monitor",
            "~callbacks.progress_bar",
            "trainer.max_steps=2",
            "callbacks.model_checkpoint.every_n_train_steps=1",
            f"paths.data_dir={cwd / 'data'}",
            *overrides,
        ],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_resume_commands_keep_the_record_true(tmp_path):
    run = tmp_path / "run"
    first = train_command(tmp_path, f"hydra.run.dir={run}")
    assert first.returncode == 0, first.stderr[-3000:]
    before = digests(run)
    last = run / "checkpoints" / "last.ckpt"

    # Another data or optimiser setting: refused before anything is built, every difference named.
    other = train_command(
        tmp_path,
        f"hydra.run.dir={tmp_path / 'other'}",
        f"ckpt_path={last}",
        "data.shots=2",
        "model.optimizer.lr=5e-4",
    )
    output = other.stdout + other.stderr
    assert other.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert "data.shots=1 (this run: 2); model.optimizer.lr=0.005 (this run: 0.0005)" in output
    assert (
        not list((tmp_path / "other").rglob("*.ckpt")) and not (tmp_path / "other" / "metrics.json").exists()
    )

    # The README's resume command on the finished run: it says so, and the folder is as it was.
    again = train_command(tmp_path, f"hydra.run.dir={run}", f"ckpt_path={last}")
    output = again.stdout + again.stderr
    assert again.returncode == 0 and "Traceback" not in output, output[-3000:]
    assert f"hydra.run.dir={run} holds a finished run" in output
    assert digests(run) == before

    # No step to take: a zero-shot run, said so, no adapters.
    nothing = train_command(tmp_path, f"hydra.run.dir={tmp_path / 'none'}", "trainer.max_steps=0")
    output = nothing.stdout + nothing.stderr
    assert nothing.returncode == 0 and "Nothing to train (trainer.max_steps=0)" in output, output[-3000:]
    metrics = json.loads((tmp_path / "none" / "metrics.json").read_text())
    assert metrics["tested"] == "zero-shot" and metrics["steps"] == 0
    assert not (tmp_path / "none" / "adapters").exists()
