"""scripts/aggregate_results.py on a fake sweep folder of metrics.json files."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "aggregate_results.py"


@pytest.fixture(scope="module")
def aggregate():
    spec = importlib.util.spec_from_file_location("aggregate_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(folder: Path, method: str, shots: int, seed: int, top1: dict[str, float]) -> None:
    """A metrics.json as train.py writes it (only the keys the script reads, plus some it ignores)."""
    folder.mkdir(parents=True)
    metrics = {
        "task_name": "sweep",
        "method": method,
        "shots": shots,
        "seed": seed,
        "test": {name: {"top1": value, "top5": 1.0, "loss": 0.5} for name, value in top1.items()},
        "steps": 500 * shots,
        "config": {"seed": seed},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    """kradapter at 1 and 4 shots on dtd and eurosat (3 seeds), and lora at 1 shot on dtd only."""
    job = 0
    dtd = {1: [0.4, 0.5, 0.6], 4: [0.6, 0.6, 0.6]}
    eurosat = {1: [0.7, 0.7, 0.7], 4: [0.8, 0.9, 1.0]}
    for shots in (1, 4):
        for seed in (1, 2, 3):
            for dataset, values in (("dtd", dtd), ("eurosat", eurosat)):
                write_run(tmp_path / str(job), "kradapter", shots, seed, {dataset: values[shots][seed - 1]})
                job += 1
    write_run(tmp_path / str(job), "lora", 1, 1, {"dtd": 0.3})
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")  # what Hydra leaves in a sweep folder
    return tmp_path


def test_markdown_table_has_mean_std_and_average(aggregate, sweep_dir, capsys):
    assert aggregate.main([str(sweep_dir)]) == 0
    expected = [
        "| method | shots | dtd | eurosat | Average |",
        "|---|---|---|---|---|",
        "| kradapter | 1 | 50.0 ± 10.0 | 70.0 ± 0.0 | 60.0 |",
        "| kradapter | 4 | 60.0 ± 0.0 | 90.0 ± 10.0 | 75.0 |",
        "| lora | 1 | 30.0 ± 0.0 | – | – |",  # no eurosat run: no average
    ]
    assert (sweep_dir / "results.md").read_text().splitlines() == expected
    printed = capsys.readouterr().out
    assert printed.startswith("\n".join(expected)) and "13 runs" in printed


def test_csv_holds_unformatted_numbers_and_seed_counts(aggregate, sweep_dir):
    aggregate.main([str(sweep_dir)])
    with (sweep_dir / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    by_key = {(row["method"], row["shots"], row["test_set"]): row for row in rows}
    assert float(by_key[("kradapter", "1", "dtd")]["mean"]) == pytest.approx(50.0)
    assert float(by_key[("kradapter", "1", "dtd")]["std"]) == pytest.approx(10.0)
    assert by_key[("kradapter", "1", "dtd")]["seeds"] == "3"
    assert float(by_key[("kradapter", "4", "Average")]["mean"]) == pytest.approx(75.0)
    assert ("lora", "1", "Average") not in by_key and by_key[("lora", "1", "dtd")]["seeds"] == "1"


def test_top5_metric(aggregate, sweep_dir):
    aggregate.main([str(sweep_dir), "--metric", "top5"])
    assert "| kradapter | 1 | 100.0 ± 0.0 | 100.0 ± 0.0 | 100.0 |" in (sweep_dir / "results.md").read_text()


def test_folder_without_runs_is_a_clear_error(aggregate, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        aggregate.main([str(tmp_path)])
    assert exited.value.code == 2
    assert "no metrics.json below" in capsys.readouterr().err


def test_run_without_the_metric_is_named(aggregate, tmp_path):
    write_run(tmp_path / "0", "kradapter", 1, 1, {"dtd": 0.5})
    metrics_path = tmp_path / "0" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    del metrics["test"]["dtd"]["top1"]
    metrics_path.write_text(json.dumps(metrics))
    with pytest.raises(KeyError, match="has no 'top1' metric"):
        aggregate.main([str(tmp_path)])
