"""The mini benchmark's plumbing (`kr_vlm.benchmarks.mini`, `scripts/mini_benchmark.py`): a tiny grid with
the tiny random CLIP and two steps a run; the full benchmark is a script, never a test."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from compose_helpers import TINY_MODEL, compose_config, path_overrides, run_state_restored
from kr_vlm.adapters import count_parameters
from kr_vlm.benchmarks import mini
from kr_vlm.callbacks.divergence import TrainingDivergedError
from kr_vlm.cli.build import build_model
from kr_vlm.results import CSV_FIELDS

REPO = Path(__file__).resolve().parents[1]
# The benchmark's runs shortened as a test needs: the tiny model and two steps.
SHORT = (*TINY_MODEL, "trainer.max_steps=2")


@pytest.fixture(autouse=True)
def _clear_hydra():
    with run_state_restored():
        yield


def run_script(cwd: Path, *arguments: str) -> subprocess.CompletedProcess:
    """``python scripts/mini_benchmark.py ...`` started in `cwd`, so that its default folders (the tables'
    and the runs', the train task's paths) land there, with the defaults' worker processes."""
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "mini_benchmark.py"), *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_the_command_runs_every_protocol_in_worker_processes_and_writes_the_tables(tmp_path):
    # Shortened in size and steps only: two methods, two shot counts, one seed, the tiny model, two steps.
    done = run_script(
        tmp_path, "--methods", "zero_shot", "kradapter", "--shots", "1", "16", "--seeds", "1", *SHORT
    )
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "outputs" / "mini_benchmark"
    results = json.loads((out / "mini_benchmark.json").read_text())
    assert results["machine"]["workers"] == 2
    selection = results["selection"]["kradapter"]
    assert selection["grid"] == list(mini.ADAPTER_LRS) and selection["chosen"] in mini.ADAPTER_LRS
    chosen = selection["chosen"]
    runs = {(run["method"], run["protocol"], run["shots"]): run for run in results["runs"]}
    # Zero-shot on each protocol's test sets; KRAdapter at the chosen rate only (the others are grid runs).
    assert set(runs) == {
        ("zero_shot", "few_shot", 0),
        ("zero_shot", "base_to_new", 0),
        ("kradapter", "few_shot", 16),
        ("kradapter", "few_shot", 1),
        ("kradapter", "base_to_new", 16),
    }
    assert {run["lr"] for run in results["runs"] if run["method"] == "kradapter"} == {chosen}
    assert sorted(run["lr"] for run in results["grid_runs"]) == sorted(set(mini.ADAPTER_LRS) - {chosen})
    few_shot = runs["kradapter", "few_shot", 16]
    assert list(few_shot["test"]) == ["digits", *mini.SHIFT_SETS, *mini.CROSS_SETS]
    assert list(runs["kradapter", "base_to_new", 16]["test"]) == ["digits_base", "digits_new"]
    assert few_shot["steps"] == 2 and 0 <= few_shot["val_top1"] <= 1
    assert results["timing"]["runs"] == 8 and results["timing"]["cpu_time_s"] > 0

    # Each run is the train task's own run folder, under the default runs folder, with the benchmark's
    # config in it; the runs' own tables went to the workers' logs, the progress lines to the console.
    (runs_dir,) = (tmp_path / "logs" / "mini_benchmark").iterdir()
    metrics = json.loads((runs_dir / few_shot["folder"] / "metrics.json").read_text())
    assert metrics["method"] == "kradapter" and metrics["config"]["model"]["optimizer"]["lr"] == chosen
    assert metrics["config"]["task_name"] == "mini_kr_fewshot" and metrics["shots"] == 16
    assert "Run folder:" not in done.stdout and "kradapter: lr" in done.stdout
    assert any("Run folder:" in path.read_text() for path in runs_dir.glob("worker.log.*"))

    markdown = (out / "mini_benchmark.md").read_text()
    titles = [line.split(":")[0] for line in markdown.splitlines() if line.startswith("### ")]
    assert titles == [
        "### Methods",
        "### Few-shot",
        "### Distribution shift",
        "### Cross-dataset transfer",
        "### Base-to-new",
    ]
    assert (
        "`python scripts/mini_benchmark.py --methods zero_shot kradapter" in markdown
        and "wall time:" in markdown
    )
    with (out / "mini_benchmark.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_FIELDS
    hm = next(
        row
        for row in rows
        if row["protocol"] == "base_to_new" and row["method"] == "KRAdapter" and row["column"] == "hm"
    )
    assert float(hm["mean"]) >= 0
    assert (out / "mini_benchmark.png").stat().st_size > 0
    assert "### Few-shot" in done.stdout and "min of CPU time" in done.stdout


def test_the_steps_follow_clip_lora_s_500_x_shots_from_half_the_mini_recipe():
    assert [mini.max_steps(shots) for shots in (1, 4, 16)] == [7, 25, 100]


def test_the_learning_rate_is_chosen_on_validation_top1_then_loss_and_never_a_diverged_run():
    runs = [
        {"lr": 1e-3, "val_top1": 0.9, "val_loss": 0.3},
        {"lr": 3e-3, "val_top1": 0.95, "val_loss": 0.4},
        {"lr": 1e-2, "val_top1": 0.95, "val_loss": 0.2},
        {"lr": 3e-2, "error": "diverged"},
    ]
    assert mini.choose_lr(runs)["lr"] == 1e-2
    assert mini.choose_lr([{"lr": 1e-1, "error": "diverged"}]) is None


def test_a_diverged_run_is_recorded_not_raised(tmp_path, monkeypatch):
    def diverge(cfg):
        raise TrainingDivergedError("the loss is nan at step 1")

    monkeypatch.setattr("kr_vlm.cli.train", diverge)
    job = mini.Job("kradapter", mini.FEW_SHOT, 16, 1, 1.0)
    record = mini.run_job(job, str(tmp_path / "runs"), (*SHORT, *path_overrides(tmp_path)[:4]))
    assert record["error"] == "the loss is nan at step 1" and record["lr"] == 1.0


def test_a_runs_folder_that_is_not_empty_is_refused(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="not empty"):
        mini.run_benchmark(mini.Settings(methods=("zero_shot",)), tmp_path / "runs")
    with pytest.raises(ValueError, match="Unknown methods"):
        mini.Settings(methods=("lorra",)).check()
    with pytest.raises(ValueError, match="keep them in --shots"):
        mini.Settings(shots=(1, 4)).check()


def test_methods_adapt_the_same_six_linears_at_about_kradapter_s_budget(tmp_path):
    """Every method but CLIP-LoRA's placement adapts q k v o fc1 fc2 of both towers; the low-rank ones
    train within 12 % of KRAdapter's count on the miniature CLIP (VeRA cannot, full fine-tuning trains all)."""
    counts, layers = {}, {}
    for method in mini.METHODS:
        if not method.trains:
            continue
        cfg = compose_config(tmp_path, [*mini.BASE_OVERRIDES, *method.overrides])
        layers[method.key] = list(cfg.adapter.targets.layers)
        counts[method.key] = count_parameters(build_model(cfg))[0]
    six = ["q", "k", "v", "o", "fc1", "fc2"]
    assert {key: value for key, value in layers.items() if value != six} == {"lora_qkv": ["q", "k", "v"]}
    budget = counts["kradapter"]
    for key in ("lora", "dora", "lokr", "loha", "randlora"):
        assert abs(counts[key] - budget) <= 0.12 * budget, (key, counts[key], budget)
    assert counts["vera"] < budget < counts["full"]
