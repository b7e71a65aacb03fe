"""``adapter_scales`` in train.py and eval.py: every test set at every update scale α in one process,
``test_by_scale`` in metrics.json, α = 0 the zero-shot baseline and α = 1 the trained result, exactly."""

from __future__ import annotations

import json

import pytest

from compose_helpers import FAST, TINY_MODEL, run_state_restored
from kr_vlm.errors import ConfigError
from test_cli import DIGIT_SETS, run_eval, run_script, run_train

# The demo (clean digits and four shifted sets, zero-shot baseline on) on the tiny model, a few steps.
TINY_DEMO = ("experiment=demo", *TINY_MODEL, *FAST, "~callbacks.rank_monitor", "trainer.max_steps=4")


@pytest.fixture(autouse=True)
def _clear_hydra():
    with run_state_restored():
        yield


def test_train_then_eval_at_each_scale(tmp_path):
    trained = run_train(tmp_path, *TINY_DEMO, "adapter_scales=[0.5,0,1]")
    assert list(trained["test_by_scale"]) == ["0", "0.5", "1"]
    for entry in trained["test_by_scale"].values():
        assert list(entry["test"]) == DIGIT_SETS
        assert set(entry) == {"test", "distribution_shift"}
    assert trained["test_by_scale"]["0"]["test"] == trained["zero_shot"]
    assert trained["test_by_scale"]["1"]["test"] == trained["test"]
    assert trained["test_by_scale"]["0.5"]["test"] != trained["test"]
    assert trained["scales_test_time_s"] > 0

    evaluated = run_eval(
        tmp_path,
        *TINY_DEMO[:-2],
        f"adapters_dir={tmp_path / 'run' / 'adapters'}",
        "adapter_scales=[0,1]",  # eval.py reloads nothing between them
        run="eval",
    )
    assert evaluated["test"] == trained["test"]
    assert evaluated["test_by_scale"]["0"]["test"] == trained["zero_shot"]
    assert evaluated["test_by_scale"]["1"] == trained["test_by_scale"]["1"]
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["test_by_scale"] == json.loads(json.dumps(evaluated["test_by_scale"]))


def test_the_default_is_one_scale_and_writes_no_test_by_scale(tmp_path):
    metrics = run_train(tmp_path, *TINY_DEMO, "data=digits", "zero_shot_baseline=false")
    assert "test_by_scale" not in metrics and "scales_test_time_s" not in metrics
    assert metrics["config"]["adapter_scales"] == [1]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["adapter_scales=0.5"], "adapter_scales must be a non-empty list"),
        (["adapter_scales=[]"], "adapter_scales must be a non-empty list"),
        (["adapter_scales=[0,-0.5]"], r"adapter_scales must hold finite numbers >= 0.*got -0.5"),
        (["adapter_scales=[0,nan]"], "adapter_scales must hold finite numbers >= 0"),
        (["adapter_scales=[0,inf]"], "adapter_scales must hold finite numbers >= 0"),
        (["adapter_scales=[0,half]"], "adapter_scales must hold finite numbers >= 0.*got 'half'"),
        (["adapter_scales=[true]"], "adapter_scales must hold finite numbers >= 0"),
        (["adapter=none", "adapter_scales=[0,1]"], r"adapter_scales=\[0, 1\] scales the adapters' updates"),
        (["test=false", "adapter_scales=[0,1]"], "test=false tests nothing"),
    ],
)
def test_bad_scales_are_config_errors_that_name_the_key(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        run_train(tmp_path, *TINY_DEMO, *overrides)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["kradapter", "lora"])
def test_on_the_demo_scale_zero_is_zero_shot_and_one_is_trained(adapter, tmp_path):
    """The issue's bar, on the real command lines: the shipped miniature CLIP, trained 20 steps, its
    adapters tested by eval.py at α = 0, 0.5, 1."""
    run = tmp_path / "run"
    trained = run_script(
        tmp_path,
        "train.py",
        "experiment=demo",
        f"adapter={adapter}",
        "trainer.max_steps=20",
        f"hydra.run.dir={run}",
        "~callbacks.rank_monitor",
    )
    assert trained.returncode == 0, trained.stderr
    evaluated = run_script(
        tmp_path,
        "eval.py",
        "experiment=demo",
        f"adapter={adapter}",
        f"adapters_dir={run / 'adapters'}",
        "adapter_scales=[0,0.5,1]",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert "top-1 % at each update scale α" in evaluated.stdout
    training = json.loads((run / "metrics.json").read_text())
    scales = json.loads((tmp_path / "eval" / "metrics.json").read_text())["test_by_scale"]
    assert list(scales) == ["0", "0.5", "1"]
    assert scales["0"]["test"] == training["zero_shot"]
    assert scales["1"]["test"] == training["test"]
    assert training["test"]["digits"]["top1"] > training["zero_shot"]["digits"]["top1"]
