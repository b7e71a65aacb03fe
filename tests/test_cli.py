"""train.py / eval.py logic (`kr_vlm.cli`): the demo end to end, train-then-eval, resuming, zero-shot,
test_ckpt=best, divergence, errors before training; DDP, sweeps (as the README writes them, from a copy
of the repository) and the command line itself in subprocesses (slow).

Runs use a tiny random CLIP (`compose_helpers.TINY_MODEL`), the embedded digits and a few steps.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra.errors import MissingConfigException
from safetensors.torch import load_file

from compose_helpers import (
    FAST,
    QUICK,
    QUICK_MONITORED,
    TINY_MODEL,
    compose_config,
    path_overrides,
    run_state_restored,
)
from coop_layout import make_coop_dataset
from kr_vlm import cli
from kr_vlm.callbacks import TrainingDivergedError
from kr_vlm.data.base import DatasetNotFoundError
from kr_vlm.errors import ConfigError, CorruptFileError, KrVlmError, MissingFileError
from kr_vlm.models import WeightsNotFoundError

REPO = Path(__file__).resolve().parents[1]
DIGIT_SETS = ["digits", "digits_inverted", "digits_rotated", "digits_noisy", "digits_edges"]
ADAPTER_WEIGHTS = "adapters/adapter_model.safetensors"


@pytest.fixture(autouse=True)
def _clear_hydra():
    with run_state_restored():
        yield


def run_train(tmp_path: Path, *overrides: str, run: str = "run") -> dict:
    """`train.py` in-process with `overrides`; the run folder is `tmp_path / run`."""
    return cli.train(compose_config(tmp_path, [*overrides, f"paths.output_dir={tmp_path / run}"]))


def run_eval(tmp_path: Path, *overrides: str, run: str) -> dict:
    return cli.evaluate(compose_config(tmp_path, [*overrides, f"paths.output_dir={tmp_path / run}"], "eval"))


def strict_json(path: Path):
    """`path` parsed as standard JSON (Python's reader would accept NaN and Infinity, which JSON lacks)."""

    def refuse(constant):
        raise ValueError(f"{path} is not JSON: {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def read_metrics(run_dir: Path) -> dict:
    return strict_json(run_dir / "metrics.json")


@pytest.fixture(scope="module")
def eight_step_run(tmp_path_factory) -> tuple[Path, dict]:
    """A finished 8-step run with a checkpoint every 4 steps (all kept), tested on clean digits."""
    tmp_path = tmp_path_factory.mktemp("eight_steps")
    with run_state_restored():
        metrics = run_train(
            tmp_path,
            *QUICK,
            "trainer.max_steps=8",
            "callbacks.model_checkpoint.every_n_train_steps=4",
            "callbacks.model_checkpoint.save_top_k=-1",
        )
    return tmp_path, metrics


def test_demo_end_to_end(tmp_path):
    metrics = run_train(tmp_path, "experiment=demo", *TINY_MODEL, *FAST, "trainer.max_steps=10")
    run_dir = tmp_path / "run"
    assert read_metrics(run_dir) == json.loads(json.dumps(metrics))
    assert list(metrics["test"]) == DIGIT_SETS
    for values in metrics["test"].values():
        assert set(values) == {"top1", "top5", "loss"} and 0.0 <= values["top1"] <= values["top5"] <= 1.0
    assert (metrics["task_name"], metrics["method"], metrics["dataset"]) == ("demo", "kradapter", "digits")
    assert metrics["steps"] == 10 and metrics["shots"] == 16 and metrics["seed"] == 1
    assert torch.get_num_threads() == 1  # the demo's cpu_threads
    assert metrics["tested"] == "last"
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert metrics["wall_time_s"] >= metrics["fit_time_s"] > 0 and metrics["test_time_s"] > 0
    assert metrics["peak_memory_mb"] > 0
    assert metrics["config"]["model"]["adapter"]["method"] == "kradapter"
    assert metrics["config"]["paths"]["output_dir"] == str(run_dir)

    report = (run_dir / "rank_report.html").read_text()
    assert "<html" in report.lower() and "data:image/png;base64" in report  # self-contained
    history = json.loads((run_dir / "rank_history.json").read_text())
    assert history  # evaluated at train start and end
    assert {path.name for path in (run_dir / "adapters").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "csv" / "metrics.csv").is_file()


def test_tensorboard_on_a_sweep_folder_shows_the_rank_curves_of_its_runs_side_by_side(tmp_path):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    for job, adapter in enumerate(["kradapter", "lora"]):
        run_train(
            tmp_path,
            *QUICK_MONITORED,
            f"adapter={adapter}",
            "logger=csv_tensorboard",
            "trainer.max_steps=4",
            run=f"sweep/{job}",
        )
    board = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "sweep")).Reload()
    # `tensorboard --logdir <sweep folder>`: one run a job, the same tags, so one chart holds both curves.
    assert sorted(board.Runs()) == ["0/tensorboard", "1/tensorboard"]
    for run in board.Runs():
        steps = [event.step for event in board.Scalars(run, "effective_rank/vision/q")]
        assert steps == [0, 2, 4]


def test_the_run_config_is_logged_once(eight_step_run):
    logged = yaml.safe_load((eight_step_run[0] / "run" / "csv" / "hparams.yaml").read_text())
    # The composed config (the adapter under `adapter` only) and the parameter counts; not the module's
    # own hyperparameters (clip, optimizer, ... at the top level) again.
    assert logged["adapter"]["method"] == "kradapter" and "adapter" not in logged["model"]
    config = eight_step_run[1]["config"]
    assert logged["model"]["optimizer"] == config["model"]["optimizer"]
    assert "clip" not in logged and "optimizer" not in logged
    assert logged["parameters"]["trainable"] == eight_step_run[1]["trainable_params"]


def test_train_returns_the_optimized_metric(tmp_path):
    metrics = run_train(tmp_path, *QUICK, "trainer.max_steps=2", "optimized_metric=val/top1")
    assert (
        metrics["optimized_metric"]["name"] == "val/top1" and 0 <= metrics["optimized_metric"]["value"] <= 1
    )
    assert read_metrics(tmp_path / "run")["optimized_metric"] == metrics["optimized_metric"]
    with pytest.raises(ConfigError, match="optimized_metric=val/top2 was not logged.*val/top1"):
        run_train(tmp_path, *QUICK, "trainer.max_steps=2", "optimized_metric=val/top2", run="typo")


def test_eval_on_saved_adapters_reproduces_the_test_accuracy(eight_step_run, tmp_path):
    train_dir, trained = eight_step_run
    evaluated = run_eval(tmp_path, *QUICK, f"adapters_dir={train_dir / 'run' / 'adapters'}", run="eval")
    # Equal losses too: a model without the trained adapters would not match to the last bit.
    assert evaluated["test"] == trained["test"]
    assert evaluated["method"] == "kradapter" and evaluated["trainable_params"] == trained["trainable_params"]
    assert read_metrics(tmp_path / "eval")["test"] == trained["test"]
    assert read_metrics(tmp_path / "eval")["adapters_from"] == str(train_dir / "run" / "adapters")
    zero_shot = run_eval(tmp_path, *QUICK, "adapter=none", run="zero_shot")
    assert zero_shot["test"]["digits"]["loss"] != trained["test"]["digits"]["loss"]
    assert read_metrics(tmp_path / "zero_shot")["adapters_from"] == "zero-shot"


def test_eval_on_a_checkpoint_reproduces_the_test_accuracy(eight_step_run, tmp_path):
    train_dir, trained = eight_step_run
    # The model and adapters come from the checkpoint: the eval config's own model is not used. One
    # thread as in training (the demo's cpu_threads), for the same float sums in the losses.
    checkpoint = train_dir / "run" / "checkpoints" / "last.ckpt"
    evaluated = run_eval(
        tmp_path, "data=digits", *FAST, "cpu_threads=1", f"ckpt_path={checkpoint}", run="eval"
    )
    assert evaluated["test"] == trained["test"]
    assert evaluated["method"] == "kradapter" and evaluated["tested"] == str(checkpoint)
    assert read_metrics(tmp_path / "eval")["adapters_from"] == str(checkpoint)


def test_eval_of_an_adapter_experiment_needs_its_adapters(tmp_path):
    with pytest.raises(
        ConfigError, match="configured with 'kradapter' adapters but eval.py was given none"
    ) as raised:
        run_eval(tmp_path, *QUICK, run="eval")
    message = str(raised.value)
    assert (
        "adapters_dir=<run folder>/adapters" in message
        and "ckpt_path=<run folder>/checkpoints/last.ckpt" in message
    )
    assert "adapter=none (or experiment=clip_zeroshot)" in message
    assert not (tmp_path / "eval").exists()


def test_resume_from_a_mid_run_checkpoint_continues_the_run(eight_step_run, tmp_path):
    train_dir, straight = eight_step_run
    middle = train_dir / "run" / "checkpoints" / "step_4.ckpt"
    resumed = run_train(
        tmp_path, *QUICK, "trainer.max_steps=8", "trainer.log_every_n_steps=1", f"ckpt_path={middle}"
    )
    assert resumed["steps"] == 8
    # Only steps 5 to 8 ran (a run that ignored the checkpoint would log steps 1 to 8).
    with (tmp_path / "run" / "csv" / "metrics.csv").open() as handle:
        logged = {int(row["step"]) for row in csv.DictReader(handle) if row["train/loss"]}
    assert logged == {4, 5, 6, 7}

    expected = load_file(train_dir / "run" / ADAPTER_WEIGHTS)
    got = load_file(tmp_path / "run" / ADAPTER_WEIGHTS)
    assert got.keys() == expected.keys()
    at_step_4 = torch.load(middle, map_location="cpu", weights_only=True)["state_dict"]
    assert all(not torch.equal(at_step_4[f"classifier.model.{name}"], got[name]) for name in got)


def test_resume_is_exact(eight_step_run, tmp_path):
    train_dir, _ = eight_step_run
    middle = train_dir / "run" / "checkpoints" / "step_4.ckpt"
    run_train(tmp_path, *QUICK, "trainer.max_steps=8", f"ckpt_path={middle}")
    expected = load_file(train_dir / "run" / ADAPTER_WEIGHTS)
    got = load_file(tmp_path / "run" / ADAPTER_WEIGHTS)
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.items())


def test_a_diverged_fit_stops_at_once_and_leaves_no_results(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDivergedError) as raised:
        run_train(
            tmp_path,
            "experiment=demo",
            *TINY_MODEL,
            *FAST,
            "model.optimizer.lr=1e6",
            "callbacks.model_checkpoint.every_n_train_steps=1",
        )
    message = str(raised.value)
    assert re.search(
        r"Training diverged at step \d+: (the loss is nan|the loss was .*, but the update left non-finite values)",
        message,
    )
    assert f"The last checkpoint, {run_dir / 'checkpoints' / 'last.ckpt'}, was saved before" in message
    assert "model.optimizer.lr, 1e+06 in this run" in message
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "adapters").exists()
    checkpoints = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints
    for name in checkpoints:
        state = torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)[
            "state_dict"
        ]
        assert all(torch.isfinite(tensor).all() for tensor in state.values())
    assert [
        strict_json(path) for path in run_dir.rglob("*.json")
    ]  # rank_history.json, written at train start


def test_non_finite_results_are_written_as_null_and_flagged(tmp_path):
    # Without the callbacks (no divergence check) the fit runs on into NaN adapters and NaN test losses.
    metrics = run_train(
        tmp_path,
        "experiment=demo",
        "data=digits",
        *TINY_MODEL,
        *FAST,
        "callbacks=none",
        "model.optimizer.lr=1e6",
        "trainer.max_steps=3",
    )
    assert math.isnan(metrics["test"]["digits"]["loss"])
    written = read_metrics(tmp_path / "run")
    assert written["test"]["digits"]["loss"] is None and "test.digits.loss" in written["non_finite"]


def test_zero_shots_means_zero_shot_evaluation(tmp_path):
    metrics = run_train(tmp_path, "experiment=demo", *TINY_MODEL, *FAST, "data.shots=0")
    assert metrics["steps"] == 0 and metrics["tested"] == "zero-shot" and "fit_time_s" not in metrics
    assert list(metrics["test"]) == DIGIT_SETS
    assert read_metrics(tmp_path / "run")["shots"] == 0
    assert not (tmp_path / "run" / "adapters").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_test_ckpt_best_tests_and_saves_the_best_checkpoint(tmp_path):
    metrics = run_train(
        tmp_path,
        *QUICK,
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "test_ckpt=best",
        "callbacks.model_checkpoint.monitor=val/top1",
        "callbacks.model_checkpoint.every_n_train_steps=null",
    )
    best = Path(metrics["tested"])
    assert best.parent == tmp_path / "run" / "checkpoints" and best.is_file()
    in_checkpoint = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    saved = load_file(tmp_path / "run" / ADAPTER_WEIGHTS)
    for name, tensor in saved.items():
        assert torch.equal(in_checkpoint[f"classifier.model.{name}"], tensor)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["test_ckpt=best"], "callbacks.model_checkpoint.monitor=val/top1"),
        (["test_ckpt=first"], "test_ckpt must be one of last, best"),
        (["data.shots=0", "ckpt_path=some.ckpt"], "eval.py ckpt_path="),
    ],
)
def test_bad_run_settings_fail_at_once(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        run_train(tmp_path, *QUICK, *overrides)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("group", "name"), [("experiment", "clip_kr_fewshot"), ("data", "dtd"), ("adapter", "lora")]
)
def test_unknown_names_list_the_valid_ones(group, name, tmp_path):
    with pytest.raises(MissingConfigException, match=f"Available options in '{group}'") as error:
        compose_config(tmp_path, [f"{group}=nope"])
    assert name in str(error.value)


@pytest.mark.parametrize(
    ("pretrained", "error"),
    [("openai", ValueError), ("{tmp}/missing/weights.safetensors", WeightsNotFoundError)],
)
def test_missing_weights_fail_before_training(pretrained, error, tmp_path):
    with pytest.raises(error) as raised:
        run_train(tmp_path, *QUICK, f"model.clip.pretrained={pretrained.format(tmp=tmp_path)}")
    assert "kr-vlm-test-tiny" in str(raised.value) or "missing" in str(raised.value)
    assert not (tmp_path / "run").exists()


def test_missing_weights_of_a_real_experiment_say_what_to_fetch(tmp_path, monkeypatch):
    make_coop_dataset(tmp_path / "data", "oxford_pets", classes=3, per_class=2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError, match="open_clip.create_model"):
        run_train(tmp_path, "experiment=clip_kr_fewshot", "data.shots=2", *FAST)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("data_root_exists", "message"), [(False, "Data root .* does not exist"), (True, "dtd")]
)
def test_missing_data_fails_before_training_with_the_data_layer_message(data_root_exists, message, tmp_path):
    if data_root_exists:
        (tmp_path / "data").mkdir()
    with pytest.raises(DatasetNotFoundError, match=message):
        run_train(tmp_path, *QUICK, "data=dtd")
    assert not (tmp_path / "run").exists()


def test_eval_needs_the_adapter_config_the_adapters_were_trained_with(eight_step_run, tmp_path):
    train_dir, _ = eight_step_run
    adapters = train_dir / "run" / "adapters"
    with pytest.raises(ValueError, match="holds 'kradapter' adapters.*adapter 'none'"):
        run_eval(tmp_path, "data=digits", *TINY_MODEL, *FAST, f"adapters_dir={adapters}", run="eval")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        run_eval(tmp_path, *QUICK, f"adapters_dir={tmp_path / 'nowhere'}", run="eval")


def broken_copy(source: Path, destination: Path, name: str, content: bytes) -> Path:
    """A copy of the folder `source` in which the file `name` holds `content`."""
    shutil.copytree(source, destination)
    (destination / name).write_bytes(content)
    return destination


def test_broken_adapter_files_are_user_errors_that_name_them(eight_step_run, tmp_path):
    adapters = eight_step_run[0] / "run" / "adapters"
    weights = (adapters / "adapter_model.safetensors").read_bytes()
    truncated = broken_copy(adapters, tmp_path / "truncated", "adapter_model.safetensors", weights[:-100])
    with pytest.raises(
        CorruptFileError, match=f"{truncated / 'adapter_model.safetensors'} is not a complete safetensors"
    ):
        run_eval(tmp_path, *QUICK, f"adapters_dir={truncated}", run="eval")
    corrupt = broken_copy(adapters, tmp_path / "corrupt", "adapter_config.json", b'{"method": "kradap')
    with pytest.raises(CorruptFileError, match=f"{corrupt / 'adapter_config.json'} is not valid JSON"):
        run_eval(tmp_path, *QUICK, f"adapters_dir={corrupt}", run="eval")
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (os.urandom(1000), "is truncated, corrupt, or not a checkpoint"),
        (None, "holds objects other than tensors and plain data"),
    ],
)
@pytest.mark.parametrize("script", ["train", "eval"])
def test_a_broken_checkpoint_is_a_user_error_that_names_it(script, content, message, tmp_path):
    checkpoint = tmp_path / "broken.ckpt"
    if content is None:  # a pickle that would run code when loaded without weights_only
        torch.save({"state_dict": {}, "hook": shutil.rmtree}, checkpoint)
    else:
        checkpoint.write_bytes(content)
    job = run_train if script == "train" else lambda *args: run_eval(*args, run="run")
    with pytest.raises(CorruptFileError, match=f"ckpt_path={checkpoint} {message}") as raised:
        job(tmp_path, *QUICK, f"ckpt_path={checkpoint}")
    assert "weights_only" not in str(raised.value)
    with pytest.raises(MissingFileError, match="ckpt_path=.*missing.ckpt: no such file"):
        job(tmp_path, *QUICK, f"ckpt_path={tmp_path / 'missing.ckpt'}")
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_of_other_adapters_is_refused_when_resuming(eight_step_run, tmp_path):
    checkpoint = eight_step_run[0] / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(
        KrVlmError, match="do not match this module's adapters.*Resume with the model and adapter"
    ):
        run_train(
            tmp_path,
            *QUICK,
            "adapter.targets.towers=vision",
            "trainer.max_steps=8",
            f"ckpt_path={checkpoint}",
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.batch_size=0"], "batch_size must be at least 1"),
        (["data.train_templates=bogus"], "train_templates must be one of"),
        (["model.clip.precision=fp8"], "precision must be one of"),
        (["+model.optimizer.momentum=0.9"], r"Unknown optimizer option\(s\) \['momentum'\]"),
        (["adapter.targets.layers=[qq]"], "layers must be a non-empty subset of"),
        (["adapter.options.rank=1000"], "KRAdapter rank must be an integer"),
        (["adapter=lora", "+adapter.options.bogus=1"], "Unknown option 'bogus' for method 'lora'"),
        (["callbacks.rank_monitor.every_n_steps=-1"], "every_n_steps must be a non-negative integer"),
    ],
)
def test_config_mistakes_are_user_errors(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        run_train(
            tmp_path, "experiment=demo", "data=digits", *TINY_MODEL, *FAST, "trainer.max_steps=1", *overrides
        )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "key"), [("data.shots=abc", "data.shots"), ("cpu_threads=two", "cpu_threads")]
)
def test_a_number_that_is_not_one_is_a_config_error(override, key, tmp_path):
    with pytest.raises(ConfigError, match=f"{key} must be a whole number, got '"):
        run_train(tmp_path, *QUICK, override)


# ------------------------------------------------------------------------------------ real command lines


def run_script(
    tmp_path: Path, script: str, *arguments: str, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """`python <script> <arguments> <paths under tmp_path> <flags>` from the repository root."""
    paths = [override for override in path_overrides(tmp_path) if not override.startswith("paths.output_dir")]
    # One thread a process: DDP's two processes share the machine's cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, script, *arguments, *paths, *flags],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_command_line_help_config_and_unknown_names(tmp_path):
    helped = run_script(tmp_path, "train.py", flags=("--help",))
    experiments = next(line for line in helped.stdout.splitlines() if line.startswith("experiment: "))
    assert helped.returncode == 0 and "clip_kr_fewshot" in experiments.split(": ")[1].split(", ")
    shown = run_script(tmp_path, "train.py", "experiment=demo", flags=("--cfg", "job"))
    assert shown.returncode == 0 and "task_name: demo" in shown.stdout
    failed = run_script(tmp_path, "eval.py", "data=nope")
    assert failed.returncode != 0
    assert "Could not find 'data/nope'" in failed.stderr and "oxford_pets" in failed.stderr
    # Missing data ends the command with the data layer's message and status 1, not a traceback.
    no_data = run_script(tmp_path, "train.py", "data=dtd")  # paths.data_dir is tmp_path / "data": absent
    output = no_data.stdout + no_data.stderr
    assert no_data.returncode == 1 and "Traceback" not in output
    assert f"DatasetNotFoundError: Data root {tmp_path / 'data'} does not exist" in output


# Runs a script as `python <script> <arguments>` would, then lists the heavy packages it imported.
HEAVY_IMPORTS = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
print(sorted({name.split(".")[0] for name in sys.modules} & {"lightning", "open_clip", "peft"}))
"""


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_help_needs_no_lightning(script):
    """`--help` answers sooner: the tasks import Lightning (seconds) only when a run starts. (torch still
    comes with the adapter schemas, whose options dataclasses live beside their torch layers.)"""
    done = subprocess.run(
        [sys.executable, "-c", HEAVY_IMPORTS, script, "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "== Configuration groups ==" in done.stdout and done.stdout.splitlines()[-1] == "[]"


@pytest.mark.slow
def test_the_console_shows_one_progress_bar_and_no_third_party_info_lines(tmp_path):
    """The demo (tiny model, 12 steps: three epochs of five batches) as a user sees it, piped."""
    done = run_script(
        tmp_path, "train.py", "experiment=demo", "data=digits", *TINY_MODEL, "trainer.max_steps=12"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    for noise in ("[root]", "GPU available", "TPU available", "Tip:", "initialized randomly", "reached."):
        assert noise not in console
    assert "[kr_vlm.models.clip][INFO] - kr-vlm-test-tiny: random weights, as configured" in done.stdout
    (bar,) = (line for line in done.stdout.splitlines() if line.startswith("Training"))
    assert " 12/12 " in bar  # one bar over all steps (Lightning's restarts every epoch: 5/5, 2/5)
    trained = done.stdout.splitlines().index(bar) + 1
    assert done.stdout.splitlines()[trained].startswith("Trained 12 steps in ")
    # The run's log file keeps them.
    (log_file,) = (tmp_path / "logs" / "demo" / "runs").glob("*/demo.log")
    kept = log_file.read_text()
    assert "[root][INFO] - Instantiating model architecture" in kept and "GPU available" in kept


def bad_adapters(folder: Path, method: str, weights: bytes) -> Path:
    """An adapters folder with a valid config for `method` (on one made-up layer) and `weights` as its tensors."""
    from kr_vlm.adapters import AdapterConfig
    from kr_vlm.adapters.io import FORMAT_VERSION

    folder.mkdir(parents=True)
    config = {"format_version": FORMAT_VERSION, **AdapterConfig(method, ["layer"]).to_dict()}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "arguments", "error"),
    [
        ("eval.py", ["experiment=demo"], "ConfigError: The model is configured with 'kradapter' adapters"),
        (
            "eval.py",
            ["experiment=demo", "adapters_dir={tmp}/nowhere"],
            "MissingFileError: No adapter config at",
        ),
        (
            "eval.py",
            ["experiment=demo", "adapters_dir={lora}"],
            "AdapterMismatchError: {lora} holds 'lora' adapters",
        ),
        (
            "eval.py",
            ["experiment=demo", "adapters_dir={cut}"],
            "CorruptFileError: {cut}/adapter_model.safetensors",
        ),
        (
            "train.py",
            ["experiment=demo", "ckpt_path={tmp}/empty.ckpt"],
            "CorruptFileError: ckpt_path={tmp}/empty.ckpt is empty",
        ),
        (
            "train.py",
            ["experiment=demo", "data.shots=abc"],
            "ConfigError: data.shots must be a whole number, got 'abc'",
        ),
        (
            "train.py",
            ["experiment=demo", "adapter.options.rank=1000"],
            "ConfigError: KRAdapter rank must be an integer",
        ),
        (
            "train.py",
            ["experiment=mini_kr_randlora", "data.min_iterations_per_epoch=-1"],
            "ConfigError: data.min_iterations_per_epoch must be a whole number >= 0",
        ),
    ],
)
def test_user_errors_end_the_command_with_one_clean_message(script, arguments, error, tmp_path):
    names = {
        "tmp": tmp_path,
        "lora": bad_adapters(tmp_path / "lora", "lora", b""),
        "cut": bad_adapters(tmp_path / "cut", "kradapter", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
    }
    (tmp_path / "empty.ckpt").touch()
    failed = run_script(tmp_path, script, *(argument.format(**names) for argument in arguments))
    output = failed.stdout + failed.stderr
    assert failed.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert error.format(**names) in output
    assert not list((tmp_path / "logs").rglob("metrics.json"))


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tmp_path):
    done = run_script(
        tmp_path,
        "train.py",
        "experiment=demo",
        "trainer=ddp_cpu",
        *TINY_MODEL,
        "trainer.max_steps=4",
        "data.shift_sets=[digits_noisy]",
        "~callbacks.progress_bar",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "logs" / "demo" / "runs").iterdir()  # rank 1 wrote into rank 0's run folder
    metrics = read_metrics(run_dir)
    assert metrics["steps"] == 4 and list(metrics["test"]) == ["digits", "digits_noisy"]
    assert metrics["config"]["trainer"]["devices"] == 2
    assert (run_dir / ADAPTER_WEIGHTS).is_file() and (run_dir / "rank_report.html").is_file()


def repository_copy(tmp_path: Path) -> Path:
    """The repository's files (tracked, and new ones not ignored) copied to `tmp_path / "repo"`, as a fresh
    clone would have them."""
    copy = tmp_path / "repo"
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    for name in tracked.decode().split("\0"):
        if name:
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name, follow_symlinks=False)
    return copy


def run_in(cwd: Path, repo: Path, *arguments: str, **env: str) -> subprocess.CompletedProcess:
    """`python <arguments>` in `cwd` with the kr_vlm of the repository copy `repo`, and `KR_VLM_ROOT` only
    if `env` sets it."""
    inherited = {key: value for key, value in os.environ.items() if key != "KR_VLM_ROOT"}
    return subprocess.run(
        [sys.executable, *arguments],
        cwd=cwd,
        env={**inherited, "PYTHONPATH": str(repo / "src"), "HYDRA_FULL_ERROR": "0", **env},
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_the_readme_demo_sweep_then_aggregate(tmp_path):
    """The README's sweep, with fewer steps, from a fresh copy of the repository and no path overrides:
    the logs land in the copy."""
    repo = repository_copy(tmp_path)
    done = run_in(repo, repo, "train.py", "-m", "experiment=demo", "seed=1,2", "trainer.max_steps=3")
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep_dir,) = (repo / "logs" / "demo" / "multiruns").iterdir()
    runs = {path.name: read_metrics(path) for path in sorted(sweep_dir.iterdir()) if path.is_dir()}
    assert sorted(runs) == ["0", "1"]
    assert [(run["seed"], run["steps"], list(run["test"])) for run in runs.values()] == [
        (1, 3, DIGIT_SETS),
        (2, 3, DIGIT_SETS),
    ]
    assert all((sweep_dir / name / ADAPTER_WEIGHTS).is_file() for name in runs)

    aggregated = run_in(repo, repo, "scripts/aggregate_results.py", str(sweep_dir))
    assert aggregated.returncode == 0, aggregated.stderr
    table = (sweep_dir / "results.md").read_text().splitlines()
    # The source's few-shot table, then the distribution-shift table of the digits domains.
    assert table[0].startswith("### Few-shot") and table[2] == "| method | shots | seeds | digits | Average |"
    assert [line.split("|")[1:4] for line in table[4:5]] == [[" kradapter ", " 16 ", " 2 "]]
    assert table[6].startswith("### Distribution shift: trained on digits")
    assert table[8] == "| method | shots | seeds | " + " | ".join(DIGIT_SETS) + " | Target avg |"
    assert (sweep_dir / "results.csv").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["repository", "elsewhere with KR_VLM_ROOT"])
def test_the_readme_clip_sweep_composes_and_stops_at_the_missing_weights(where, tmp_path):
    """Offline, the CLIP sweep of the README can only stop at the missing ViT-B/16 weights: with the
    clean message, from the repository root or from another folder with KR_VLM_ROOT."""
    coop = tmp_path / "coop"
    for dataset in ("dtd", "eurosat"):
        make_coop_dataset(coop, dataset, classes=3, per_class=2)
    repo = repository_copy(tmp_path)
    cwd, env = repo, {}
    if where != "repository":
        cwd, env = tmp_path / "elsewhere", {"KR_VLM_ROOT": str(tmp_path / "root")}
        cwd.mkdir()
    done = run_in(
        cwd,
        repo,
        str(repo / "train.py"),
        "-m",
        "experiment=clip_kr_fewshot",
        "data=dtd,eurosat",
        "data.shots=1,4,16",
        "seed=1,2,3",
        f"paths.data_dir={coop}",
        # No weights anywhere: empty caches.
        HOME=str(tmp_path / "home"),
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
        **env,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert (
        "WeightsNotFoundError:" in output
        and "open_clip.create_model('ViT-B-16', pretrained='openai')" in output
    )
    root = Path(env.get("KR_VLM_ROOT", repo))
    (sweep_dir,) = (root / "logs" / "clip_kr_fewshot" / "multiruns").iterdir()
    assert (sweep_dir / "multirun.yaml").is_file() and not list(sweep_dir.rglob("metrics.json"))


@pytest.mark.slow
def test_the_readme_hyperparameter_search(tmp_path):
    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        pytest.skip("hydra-optuna-sweeper is not installed (pip install -e '.[optuna]')")
    done = run_script(
        tmp_path,
        "train.py",
        "hparams_search=demo_lr",
        "experiment=demo",
        "trainer.max_steps=3",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=1",
        "~callbacks.progress_bar",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "logs" / "demo" / "multiruns").iterdir()
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert 1e-3 <= results["best_params"]["model.optimizer.lr"] <= 5e-2
    trials = [read_metrics(sweep_dir / name) for name in ("0", "1")]
    assert results["best_value"] == max(trial["optimized_metric"]["value"] for trial in trials)


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_exits_non_zero_and_claims_no_results(tmp_path):
    run_dir = tmp_path / "stopped"
    paths = [override for override in path_overrides(tmp_path) if not override.startswith("paths.output_dir")]
    command = [sys.executable, "train.py", "experiment=demo", *TINY_MODEL, "trainer.max_steps=100000"]
    command += [*paths, f"hydra.run.dir={run_dir}", "trainer.log_every_n_steps=1"]
    process = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    try:
        # Stop it once it trains: the CSV log gets its first rows.
        deadline = time.monotonic() + 300
        while not (run_dir / "csv" / "metrics.csv").is_file() and process.poll() is None:
            assert time.monotonic() < deadline, "the run never started training"
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Stopped by SIGTERM" in output and "Traceback" not in output
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "adapters").exists()


def test_a_run_stopped_by_sigterm_before_lightning_starts_says_so_too(tmp_path):
    # While the data and the model are built (and between the zero-shot test and the fit) Lightning's own
    # handler is not installed: the run must stop the same way, not die of the signal.
    run_dir = tmp_path / "stopped"
    paths = [override for override in path_overrides(tmp_path) if not override.startswith("paths.output_dir")]
    command = [sys.executable, "train.py", "experiment=demo", *TINY_MODEL, f"hydra.run.dir={run_dir}", *paths]
    process = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 300
        log_file = run_dir / "demo.log"
        while process.poll() is None and "Building the data" not in (
            log_file.read_text() if log_file.is_file() else ""
        ):
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Stopped by SIGTERM" in output and "Traceback" not in output
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "adapters").exists()
    # The folder says the run stopped, so it does not pass for a finished or a running one.
    assert json.loads((run_dir / "failed.json").read_text())["status"] == "stopped"


def test_the_demo_tests_zero_shot_first_and_leaves_the_fit_as_it_was(tmp_path):
    # LoRA's dropout draws from torch's global generator: the zero-shot test before the fit must not move it.
    lora = ("adapter=lora", "trainer.max_steps=6")
    baseline = run_train(tmp_path, *QUICK, *lora, run="with_baseline")
    assert baseline["zero_shot"].keys() == baseline["test"].keys()
    plain = run_train(tmp_path, *QUICK, *lora, "zero_shot_baseline=false", run="without")
    assert "zero_shot" not in plain and plain["test"] == baseline["test"]
    with_baseline = load_file(tmp_path / "with_baseline" / ADAPTER_WEIGHTS)
    without = load_file(tmp_path / "without" / ADAPTER_WEIGHTS)
    assert all(torch.equal(tensor, without[name]) for name, tensor in with_baseline.items())
    # The baseline is the untrained model: what eval.py measures zero-shot.
    zero_shot = run_eval(tmp_path, *QUICK, "adapter=none", run="zero_shot")
    assert baseline["zero_shot"] == zero_shot["test"]
