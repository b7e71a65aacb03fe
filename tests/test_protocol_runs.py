"""The protocols end to end: base-to-new in one run, the four tables from runs on the digits data, the
global batch under DDP, and sweeps through Hydra's submitit launcher (local processes, SLURM config).

Runs use a tiny random CLIP (`compose_helpers.TINY_MODEL`), the embedded digits and a few steps.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from compose_helpers import FAST, TINY_MODEL, path_overrides, run_state_restored
from coop_layout import make_coop_dataset
from kr_vlm import cli, results
from test_cli import QUICK, read_metrics, run_eval, run_script, run_train

REPO = Path(__file__).resolve().parents[1]
# A run of every protocol's experiment on the digits, as short as a test needs.
SHORT = (*TINY_MODEL, *FAST, "trainer.max_steps=2", "~callbacks.rank_monitor", "~callbacks.progress_bar")


@pytest.fixture(autouse=True)
def _clear_hydra():
    with run_state_restored():
        yield


def aggregate_script():
    spec = importlib.util.spec_from_file_location(
        "aggregate_results", REPO / "scripts" / "aggregate_results.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_base_to_new_on_digits_writes_base_new_and_hm(tmp_path):
    metrics = run_train(tmp_path, "experiment=clip_kr_base2new", "data=digits", *SHORT)
    written = read_metrics(tmp_path / "run")
    assert list(written["test"]) == ["digits_base", "digits_new"]
    assert written["test_roles"] == {"digits_base": "base", "digits_new": "new"}
    base, new = written["test"]["digits_base"]["top1"], written["test"]["digits_new"]["top1"]
    assert written["base_to_new"] == {
        "base": base,
        "new": new,
        "hm": pytest.approx(2 * base * new / (base + new)),
    }
    assert metrics["config"]["data"]["subsample"] == "base_to_new" and metrics["steps"] == 2


@pytest.mark.slow
def test_the_four_tables_from_runs_on_the_digits_data(tmp_path, capsys):
    """Few-shot (digits), base-to-new (digits 0-4 / 5-9), distribution shift (digits_ood) and
    cross-dataset (digits -> a tiny DTD in CoOp's layout); two seeds each, and one re-evaluation."""
    make_coop_dataset(tmp_path / "data", "dtd", classes=3, per_class=2)
    protocols = {
        "few_shot": ["experiment=demo", "data=digits"],
        "base_to_new": ["experiment=clip_kr_base2new", "data=digits"],
        "shift": ["experiment=demo", "data=digits_ood", "data.shift_sets=[digits_noisy,digits_edges]"],
        "cross": ["experiment=demo", "data=digits", "data.test_sets=[dtd]"],
    }
    for name, overrides in protocols.items():
        for seed in (1, 2):
            run_train(
                tmp_path, *overrides, *SHORT, "data.shots=1", f"seed={seed}", run=f"sweep/{name}_{seed}"
            )
    adapters = tmp_path / "sweep" / "few_shot_2" / "adapters"
    run_eval(tmp_path, "experiment=demo", "data=digits", *SHORT, f"adapters_dir={adapters}", run="sweep/eval")

    assert aggregate_script().main([str(tmp_path / "sweep")]) == 0
    printed = capsys.readouterr().out
    titles = [line for line in printed.splitlines() if line.startswith("### ")]
    assert [title.split(":")[0] for title in titles] == [
        "### Few-shot",
        "### Base-to-new generalisation",
        "### Distribution shift",
        "### Cross-dataset transfer",
    ]
    # A seed's few-shot, shift and cross runs train the same model, which the eval tested again.
    assert "9 runs (5 repeated results of the same trained model counted once)" in printed
    measured = results.measure(results.load_runs(tmp_path / "sweep"))
    tables = {table.protocol: table for table in results.protocol_tables(measured)}
    assert tables["few_shot"].header[3:] == ["digits", "Average"]
    # The few-shot, shift and cross runs are the same model a seed: two seeds, the eval not a third.
    assert {row[2] for row in tables["few_shot"].rows} == {"2"}
    assert tables["base_to_new"].rows[0][:4] == ["digits", "kradapter", "1", "2"]
    assert tables["distribution_shift"].header[3:] == ["digits", "digits_noisy", "digits_edges", "Target avg"]
    assert tables["cross_dataset"].header[3:] == ["digits", "dtd", "Target avg"]


@pytest.mark.slow
def test_ddp_divides_the_global_batch_over_the_processes(tmp_path):
    # 16 shots x 10 digits = 160 images, 80 a process: 5 batches of 16 an epoch (3 of 32 without the split).
    done = run_script(
        tmp_path,
        "train.py",
        "experiment=demo",
        "data=digits",
        "trainer=ddp_cpu",
        *TINY_MODEL,
        "trainer.max_steps=5",
        "trainer.log_every_n_steps=1",
        "~callbacks.rank_monitor",
        "~callbacks.progress_bar",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "logs" / "demo" / "runs").iterdir()
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        epochs = {int(row["epoch"]) for row in csv.DictReader(handle) if row.get("train/loss")}
    assert epochs == {0}  # five steps, one epoch
    assert read_metrics(run_dir)["config"]["data"]["batch_size"] == 32


@pytest.mark.slow
def test_a_sweep_in_local_processes_with_the_submitit_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the [slurm] extra")
    done = run_script(
        tmp_path,
        "train.py",
        "-m",
        "hydra/launcher=local_processes",
        *QUICK,
        "seed=1,2",
        "trainer.max_steps=2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "logs" / "demo" / "multiruns").iterdir()
    runs = [read_metrics(path.parent) for path in sorted(sweep_dir.glob("*/metrics.json"))]
    assert sorted(run["seed"] for run in runs) == [1, 2] and all(run["steps"] == 2 for run in runs)
    assert list((sweep_dir / ".submitit").iterdir())  # the jobs' logs and pickles, one folder a job


def test_the_slurm_launcher_submits_a_job_array_with_one_gpu_a_job(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the [slurm] extra")
    from submitit.slurm.slurm import SlurmExecutor

    overrides = [*path_overrides(tmp_path), "hydra/launcher=slurm", "hydra.launcher.partition=gpu"]
    with initialize_config_dir(config_dir=cli.CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)

    class Submitted(Exception):
        """Raised instead of calling sbatch."""

    def submit(executor, submissions):
        raise Submitted(len(submissions), executor._make_submission_file_text("<command>", "<uid>"))

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # as if srun were there
    monkeypatch.setattr(SlurmExecutor, "_internal_process_submissions", submit)
    with pytest.raises(Submitted) as submitted:
        launcher.launch([["seed=1"], ["seed=2"]], initial_job_idx=0)
    jobs, sbatch = submitted.value.args
    assert jobs == 2  # one array of two jobs
    for line in ["--gpus-per-node=1", "--ntasks-per-node=1", "--time=240", "--mem=32GB", "--partition=gpu"]:
        assert f"#SBATCH {line}\n" in sbatch
    assert launcher.params["array_parallelism"] == 64 and launcher.params["cpus_per_task"] == 6
