"""scripts/aggregate_results.py on fake folders of metrics.json files (the tables: test_results.py)."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from metrics_files import write_run

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "aggregate_results.py"


@pytest.fixture(scope="module")
def aggregate():
    spec = importlib.util.spec_from_file_location("aggregate_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    """kradapter at 1 and 4 shots on dtd and eurosat (3 seeds), and lora at 1 shot on dtd only."""
    dtd = {1: [0.4, 0.5, 0.6], 4: [0.6, 0.6, 0.6]}
    eurosat = {1: [0.7, 0.7, 0.7], 4: [0.8, 0.9, 1.0]}
    job = 0
    for shots in (1, 4):
        for seed in (1, 2, 3):
            for dataset, values in (("dtd", dtd), ("eurosat", eurosat)):
                top1 = {dataset: values[shots][seed - 1]}
                write_run(
                    tmp_path / str(job), top1, {dataset: "source"}, dataset=dataset, shots=shots, seed=seed
                )
                job += 1
    write_run(tmp_path / str(job), {"dtd": 0.3}, {"dtd": "source"}, method="lora", shots=1)
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")  # what Hydra leaves in a sweep folder
    return tmp_path


FEW_SHOT = [
    "### Few-shot: top-1 % on each dataset's test set (mean ± std over seeds)",
    "",
    "| method | shots | seeds | dtd | eurosat | Average |",
    "|---|---|---|---|---|---|",
    "| kradapter | 1 | 3 | 50.0 ± 10.0 | 70.0 ± 0.0 | 60.0 |",
    "| lora | 1 | 1 | 30.0 | – | – |",  # no eurosat run: no average
    "| kradapter | 4 | 3 | 60.0 ± 0.0 | 90.0 ± 10.0 | 75.0 |",
]


def test_markdown_tables_are_printed_and_written(aggregate, sweep_dir, capsys):
    assert aggregate.main([str(sweep_dir)]) == 0
    assert (sweep_dir / "results.md").read_text().splitlines() == FEW_SHOT
    printed = capsys.readouterr().out
    assert printed.startswith("\n".join(FEW_SHOT)) and "13 runs." in printed


def test_csv_holds_unformatted_numbers_and_seed_counts(aggregate, sweep_dir):
    aggregate.main([str(sweep_dir)])
    with (sweep_dir / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    by_key = {(row["method"], row["shots"], row["column"]): row for row in rows}
    assert {row["protocol"] for row in rows} == {"few_shot"}
    assert float(by_key[("kradapter", "1", "dtd")]["mean"]) == pytest.approx(50.0)
    assert float(by_key[("kradapter", "1", "dtd")]["std"]) == pytest.approx(10.0)
    assert by_key[("kradapter", "1", "dtd")]["seeds"] == "3"
    assert float(by_key[("kradapter", "4", "Average")]["mean"]) == pytest.approx(75.0)
    assert ("lora", "1", "Average") not in by_key and by_key[("lora", "1", "dtd")]["seeds"] == "1"


def test_top5_metric(aggregate, sweep_dir):
    aggregate.main([str(sweep_dir), "--metric", "top5"])
    table = (sweep_dir / "results.md").read_text()
    assert table.startswith("### Few-shot: top-5 %")
    assert "| kradapter | 1 | 3 | 100.0 ± 0.0 | 100.0 ± 0.0 | 100.0 |" in table


def test_several_folders_and_the_published_rows(aggregate, tmp_path, capsys):
    write_run(tmp_path / "a" / "0", {"dtd": 0.7}, {"dtd": "source"}, shots=16)
    write_run(tmp_path / "b" / "0", {"eurosat": 0.8}, {"eurosat": "source"}, dataset="eurosat", shots=16)
    assert aggregate.main([str(tmp_path / "a"), str(tmp_path / "b"), "--reference"]) == 0
    printed = capsys.readouterr().out
    assert "| kradapter | 16 | 1 | 70.0 | 80.0 | 75.0 |" in printed
    assert "| CLIP-LoRA (published) | 16 |  | 72.0 | 92.2 | 82.9 |" in printed
    assert "| Δ kradapter − CLIP-LoRA | 16 |  | -2.0 | -12.2 | – |" in printed
    assert "CLIP-LoRA (published): Zanella & Ben Ayed" in printed
    assert not list(tmp_path.rglob("results.md"))  # several folders: written only with --output-dir
    aggregate.main([str(tmp_path / "a"), str(tmp_path / "b"), "--output-dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "results.md").is_file() and (tmp_path / "out" / "results.csv").is_file()


def test_a_reference_file_of_ones_own(aggregate, tmp_path, capsys):
    write_run(tmp_path / "runs" / "0", {"digits": 0.9}, {"digits": "source"}, dataset="digits", shots=4)
    references = tmp_path / "refs.json"
    row = {"name": "Mine", "protocol": "few_shot", "source": "my notes", "rows": {"4": {"digits": 85.0}}}
    references.write_text(json.dumps({"references": [row]}))
    aggregate.main([str(tmp_path / "runs"), "--reference-file", str(references)])
    printed = capsys.readouterr().out
    assert (
        "| Mine (published) | 4 |  | 85.0 | – |" in printed
        and "| Δ kradapter − Mine | 4 |  | +5.0 | – |" in printed
    )


def test_folder_without_runs_is_a_clear_error(aggregate, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        aggregate.main([str(tmp_path)])
    assert exited.value.code == 2
    assert "no metrics.json below" in capsys.readouterr().err


def test_references_are_top1_only(aggregate, sweep_dir, capsys):
    with pytest.raises(SystemExit):
        aggregate.main([str(sweep_dir), "--metric", "top5", "--reference"])
    assert "published rows are top-1" in capsys.readouterr().err


def test_run_without_the_metric_is_named(aggregate, tmp_path):
    write_run(tmp_path / "0", {"dtd": 0.5}, {"dtd": "source"})
    metrics_path = tmp_path / "0" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    del metrics["test"]["dtd"]["top1"]
    metrics_path.write_text(json.dumps(metrics))
    with pytest.raises(KeyError, match="has no 'top1' metric"):
        aggregate.main([str(tmp_path)])


def test_every_option_has_help_text(aggregate):
    actions = aggregate.build_parser()._actions
    assert {"folders", "--metric", "--reference", "--reference-file", "--output-dir"} <= {
        action.option_strings[-1] if action.option_strings else action.dest for action in actions
    }
    assert all(action.help for action in actions)
    helped = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120
    )
    assert helped.returncode == 0 and "harmonic mean" in helped.stdout


def test_runs_that_did_not_finish_are_left_out_and_named(aggregate, sweep_dir, capsys):
    failed = sweep_dir / "99"
    failed.mkdir()
    (failed / "failed.json").write_text('{"status": "failed", "error": "ConfigError: seed"}')
    assert aggregate.main([str(sweep_dir)]) == 0
    assert (sweep_dir / "results.md").read_text().splitlines() == FEW_SHOT
    assert f"Left out 1 runs that did not finish (failed.json): {failed}." in capsys.readouterr().out
