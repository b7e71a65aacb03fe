"""The one error boundary of every command (`kr_vlm.errors.command_boundary`): a user error is one message
that names the key or the path, exit status 1; a bug is one line saying where its traceback was saved, exit
status 2; never a traceback on the console. The commands run as a user types them, in subprocesses (those
that fail at composition or before anything is built take seconds; they run side by side)."""

from __future__ import annotations

import errno
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from compose_helpers import QUICK, TINY_MODEL, compose_config, path_overrides, run_state_restored
from kr_vlm import cli
from kr_vlm.cli.schemas import TrainerSchema
from kr_vlm.errors import BUG_EXIT, USER_ERROR_EXIT, ConfigError, KrVlmError, user_error_message
from kr_vlm.files import FileWriteError, write_text_atomic
from kr_vlm.run_folder import FAILED_FILE
from metrics_files import write_run

REPO = Path(__file__).resolve().parents[1]
QUICK_ARGS = ["experiment=demo", "data=digits", "data.num_workers=0", "trainer=cpu", "trainer.max_steps=2"]


@pytest.fixture(autouse=True)
def _clear_hydra():
    with run_state_restored():
        yield


def start(tmp_path: Path, *arguments: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python <arguments>` from the repository root, every path under `tmp_path`, output captured."""
    environment = {name: value for name, value in os.environ.items() if name != "HYDRA_FULL_ERROR"}
    environment.update({"OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), **(env or {})})
    return subprocess.Popen(
        [sys.executable, *arguments],
        cwd=REPO,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=600)
    return process.returncode, output


def train_paths(tmp_path: Path) -> list[str]:
    return [override for override in path_overrides(tmp_path) if not override.startswith("paths.output_dir")]


# Each case: the overrides, and what the one message must say. Composition errors (Hydra's, with the key)
# leave no run folder; values no schema can check stop before anything is built, marked failed in the folder.
COMPOSITION_ERRORS = {
    "trainer.max_steps=abc": ["full_key: trainer.max_steps", "could not be converted to Integer"],
    "data=nope": ["Could not find 'data/nope'", "oxford_pets"],
}
CHECKED_BEFORE_BUILDING = {
    "trainer.max_steps=-5": ["trainer.max_steps must be a whole number >= -1", "got -5"],
    "trainer.precision=bogus": ["trainer.precision must be one of", "bf16-mixed", "got 'bogus'"],
    "seed=abc": ["seed must be a whole number, got 'abc'"],
    "data.dataset=dtdd": ["Unknown dataset 'dtdd' (data.dataset)", "Close matches: dtd."],
    "model.clip.name=ViT-Nope": [
        "Unknown open_clip model name 'ViT-Nope' (model.clip.name)",
        "Close matches",
    ],
}


@pytest.mark.slow
def test_bad_values_and_run_folders_end_train_py_with_one_message(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    run_folders = {
        f"hydra.run.dir={a_file}": ["hydra.run.dir=", "cannot be used as a run folder", "File exists"],
        f"hydra.run.dir={tmp_path / ('x' * 300)}": ["hydra.run.dir=", "File name too long"],
    }
    cases = {**COMPOSITION_ERRORS, **CHECKED_BEFORE_BUILDING, **run_folders}
    logs = {override: tmp_path / f"logs{number}" for number, override in enumerate(cases)}
    processes = {
        override: start(
            tmp_path,
            "train.py",
            *QUICK_ARGS,
            *train_paths(tmp_path),
            f"paths.log_dir={logs[override]}",
            override,
        )
        for override in cases
    }
    # HYDRA_FULL_ERROR=1 lets the traceback through, as for Hydra's own errors.
    full = start(tmp_path, "train.py", "trainer.max_steps=abc", env={"HYDRA_FULL_ERROR": "1"})
    for override, process in processes.items():
        status, output = finish(process)
        assert status == USER_ERROR_EXIT and "Traceback" not in output, (override, output[-3000:])
        for part in cases[override]:
            assert part in output, (override, part, output[-3000:])
        runs = list(logs[override].rglob("*.log"))
        if override in CHECKED_BEFORE_BUILDING:
            # The run folder Hydra made says that the run failed, and why; nothing looks like a result.
            (log_file,) = runs
            failed = json.loads((log_file.parent / FAILED_FILE).read_text())
            assert failed["status"] == "failed" and cases[override][0] in failed["error"]
            assert not (log_file.parent / "metrics.json").exists()
        else:
            assert not runs, override
    assert a_file.read_text() == "not a folder"
    status, output = finish(full)
    assert status == USER_ERROR_EXIT and "Traceback (most recent call last)" in output


# Runs a command with one function of kr_vlm replaced by one that raises: a bug, as far as the boundary knows.
INJECT_BUG = """
import runpy, sys
import {module} as target
def broken(*args, **kwargs):
    raise RuntimeError("injected bug\\nsecond line")
setattr(target, {name!r}, broken)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_bug_is_one_line_with_exit_status_2_and_its_traceback_saved(tmp_path):
    in_run = start(
        tmp_path,
        "-c",
        INJECT_BUG.format(module="kr_vlm.cli.tasks", name="build_datamodule"),
        "train.py",
        *QUICK_ARGS,
        *train_paths(tmp_path),
    )
    # Before a run folder exists (a script): the traceback goes to a file in the temporary folder.
    (tmp_path / "sweep" / "0").mkdir(parents=True)
    no_run = start(
        tmp_path,
        "-c",
        INJECT_BUG.format(module="kr_vlm.results", name="load_runs"),
        "scripts/aggregate_results.py",
        str(tmp_path / "sweep"),
    )
    for process, saved_in in ((in_run, "demo.log"), (no_run, "kr_vlm_traceback_")):
        status, output = finish(process)
        assert status == BUG_EXIT and "Traceback" not in output, output[-3000:]
        (line,) = [line for line in output.splitlines() if "Bug in kr_vlm" in line]
        assert "RuntimeError: injected bug." in line and "HYDRA_FULL_ERROR=1" in line
        saved = Path(line.split("The full traceback is in ")[1].split(";")[0])
        assert saved.name.startswith(saved_in) and saved.is_relative_to(tmp_path)
        kept = saved.read_text()
        assert "Traceback (most recent call last)" in kept and "in broken" in kept and "second line" in kept
    (run_folder,) = (tmp_path / "logs" / "demo" / "runs").iterdir()
    assert json.loads((run_folder / FAILED_FILE).read_text())["error"] == "RuntimeError: injected bug"


def test_a_script_names_the_folder_it_cannot_write(tmp_path):
    """aggregate_results.py with its output folder below a file: one message naming the path, status 1."""
    write_run(tmp_path / "sweep" / "0", {"dtd": 0.5})
    (tmp_path / "a_file").write_text("")
    status, output = finish(
        start(
            tmp_path,
            "scripts/aggregate_results.py",
            str(tmp_path / "sweep"),
            "--output-dir",
            str(tmp_path / "a_file" / "out"),
        )
    )
    assert status == USER_ERROR_EXIT and "Traceback" not in output, output[-3000:]
    assert f"{tmp_path / 'a_file'}" in output.splitlines()[-1]


def test_an_unwritable_folder_is_one_error_naming_the_file(tmp_path, monkeypatch):
    """A read-only folder (simulated: the test may run as root): the clean-up of the temporary file fails
    the same way, and must not hide the first error."""
    target = tmp_path / "page.html"

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(args[0]))

    monkeypatch.setattr(os, "replace", refuse)
    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(FileWriteError) as raised:
        write_text_atomic(target, "<html></html>")
    assert str(target) in str(raised.value) and "Read-only file system" in str(raised.value)
    assert raised.value.errno == errno.EROFS
    assert user_error_message(raised.value).startswith("FileWriteError: Cannot write")


def test_user_error_messages_name_the_path_or_the_key():
    from hydra.errors import ConfigCompositionException
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    long_name = OSError(errno.ENAMETOOLONG, "File name too long", "/runs/" + "x" * 300)
    assert user_error_message(long_name).startswith("OSError: File name too long: /runs/xxx")
    assert "Choose a shorter name" in user_error_message(long_name)
    assert "trainer.* and callbacks.*" in user_error_message(MisconfigurationException("bad"))
    assert "Could not override" in user_error_message(ConfigCompositionException("Could not override 'x'"))
    assert user_error_message(ConfigError("seed must be a whole number")) == (
        "ConfigError: seed must be a whole number"
    )
    # An error of a DataLoader worker, re-raised by torch with the worker's traceback as its message.
    from_worker = KrVlmError(
        "Caught KrVlmError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nkr_vlm.errors.KrVlmError: image.jpg is corrupt'
    )
    assert user_error_message(from_worker) == "KrVlmError: image.jpg is corrupt"
    for bug in (RuntimeError("x"), KeyError("x"), OSError("no path"), AssertionError()):
        assert user_error_message(bug) is None


def test_the_trainer_schema_has_lightnings_arguments_and_defaults():
    """What the schema passes to `Trainer` for keys no config sets must be Lightning's own defaults."""
    from lightning.pytorch import Trainer

    expected = {
        name: parameter.default
        for name, parameter in inspect.signature(Trainer.__init__).parameters.items()
        if name != "self"
    }
    schema = OmegaConf.to_container(OmegaConf.structured(TrainerSchema))
    assert schema.pop("_target_") == "lightning.pytorch.Trainer"
    assert schema == expected


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_epochs=-2", "trainer.max_epochs must be a whole number >= -1"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches must be a whole number >= 1"),
        ("trainer.precision=16-true", None),
        ("trainer.precision=bf16", None),
    ],
)
def test_trainer_values_are_checked_before_anything_is_built(override, message, tmp_path):
    cfg = compose_config(tmp_path, [*QUICK, override])
    if message is None:
        cli.checks.check_values(cfg)
        return
    with pytest.raises(ConfigError, match=message):
        cli.train(cfg)
    assert not (tmp_path / "run").exists()


def test_eval_checks_the_same_values(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=mini_zeroshot", *TINY_MODEL, "seed=one"], "eval")
    with pytest.raises(ConfigError, match="seed must be a whole number, got 'one'"):
        cli.evaluate(cfg)


def test_errors_of_the_libraries_that_build_a_part_name_its_settings(tmp_path):
    from torchvision.datasets import MNIST

    from kr_vlm.cli.build import DATA_LIBRARIES, MODEL_LIBRARIES, settings_of

    with (
        pytest.raises(
            ConfigError, match=r"torchvision cannot build what data\.\* configure: RuntimeError: Dataset"
        ),
        settings_of("data.*", DATA_LIBRARIES),
    ):
        MNIST(str(tmp_path), download=False)
    # The same error, raised by another library than those named, or by kr_vlm itself, goes on as it is.
    with pytest.raises(RuntimeError, match="Dataset not found"), settings_of("model.*", MODEL_LIBRARIES):
        MNIST(str(tmp_path), download=False)
    with pytest.raises(KeyError), settings_of("data.*", DATA_LIBRARIES):
        {}["a bug"]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("adapter_scales=abc", "adapter_scales"),  # update scales
        ("data.sampler=bogus", "data.sampler"),  # the few-shot draws of this round
        ("data.fraction=2.0", "data.fraction"),  # the authors' data-ratio recipe
        ("data.val_shots=-1", "data.val_shots"),
        ("data.test_sets=[dtdd]", "data.test_sets"),
        ("model.loss=bogus", "full_key: model.loss"),  # the authors' caption loss
        ("trainer.devices=0", "Trainer(devices=0)"),  # Lightning's own checks
        ("trainer.val_check_interval=abc", "val_check_interval"),
    ],
)
def test_bad_inputs_of_this_rounds_features_are_user_errors_that_name_them(override, named, tmp_path):
    with pytest.raises(Exception) as raised:  # noqa: PT011 (the boundary decides what it is)
        cli.train(compose_config(tmp_path, [*QUICK, override]))
    message = user_error_message(raised.value)
    assert message is not None and named in message, message
