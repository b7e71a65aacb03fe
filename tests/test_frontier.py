"""The ID / OOD frontier (kr_vlm.results.frontier) on hand-made metrics.json files with known answers,
and scripts/aggregate_results.py writing it beside results.md."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from kr_vlm import results
from metrics_files import write_run
from test_aggregate_results import SCRIPT

ROLES = {"digits": "source", "digits_rotated": "shift"}


def scales(points: dict[float, tuple[float, float]]) -> dict:
    """metrics.json's test_by_scale for (ID, OOD) top-1 % points of the demo's two roles."""
    return {
        str(alpha): {"test": {"digits": {"top1": id_ / 100}, "digits_rotated": {"top1": ood / 100}}}
        for alpha, (id_, ood) in points.items()
    }


def digits_run(folder: Path, points: dict, *, method="kradapter", lr=1e-3, seed=1, **extra) -> Path:
    top1 = {"digits": points[1.0][0] / 100, "digits_rotated": points[1.0][1] / 100}
    return write_run(folder, top1, ROLES, method=method, dataset="digits", lr=lr, seed=seed, **extra)


@pytest.fixture
def sweep(tmp_path) -> Path:
    """KRAdapter at two learning rates (two seeds at lr 1e-3, both tested at α = 0, 0.5, 1), LoRA trained
    with the zero-shot baseline and its adapters evaluated at α = 0, 0.5, 1 by eval.py, and a zero-shot run."""
    zero = (60.0, 50.0)
    kr_seed1 = {0.0: zero, 0.5: (80.0, 55.0), 1.0: (90.0, 40.0)}
    kr_seed2 = {0.0: zero, 0.5: (80.0, 57.0), 1.0: (90.0, 42.0)}
    digits_run(tmp_path / "0", kr_seed1, test_by_scale=scales(kr_seed1))
    digits_run(tmp_path / "1", kr_seed2, seed=2, test_by_scale=scales(kr_seed2))
    kr_high = {0.0: zero, 1.0: (85.0, 30.0)}
    digits_run(tmp_path / "2", kr_high, lr=1e-2, test_by_scale=scales(kr_high))
    lora = {1.0: (70.0, 52.0)}
    zero_shot = scales({0.0: zero})["0.0"]["test"]
    digits_run(tmp_path / "3", lora, method="lora", zero_shot=zero_shot)
    evaluated = {0.0: zero, 0.5: (66.0, 53.0), 1.0: (70.0, 52.0)}
    digits_run(
        tmp_path / "eval",
        evaluated,
        method="lora",
        evaluation_of=tmp_path / "3" / "adapters",
        test_by_scale=scales(evaluated),
    )
    digits_run(tmp_path / "zero-shot", {1.0: zero}, method="none")
    return tmp_path


def test_where_the_id_first_reaches_a_target_is_interpolated_along_the_curve():
    curve = [(60.0, 50.0), (80.0, 56.0), (70.0, 10.0), (90.0, 41.0)]
    assert results.ood_where_id_reaches(curve, 75.0) == pytest.approx(54.5)  # 3/4 of the first segment
    assert results.ood_where_id_reaches(curve, 80.0) == pytest.approx(56.0)  # reached at a point: first time
    assert results.ood_where_id_reaches(curve, 85.0) == pytest.approx(33.25)  # after the dip, not before it
    assert results.ood_where_id_reaches(curve, 55.0) == pytest.approx(50.0)  # the start already reaches it
    assert results.ood_where_id_reaches(curve, 95.0) is None


def test_the_table_reads_each_methods_ood_at_shares_of_its_best_gain(sweep):
    [frontier] = results.frontiers(results.load_runs(sweep))
    assert frontier.panel == results.frontier.Panel("distribution_shift", "digits", 16, "ViT-B-16")
    assert frontier.zero_shot == pytest.approx((60.0, 50.0))
    # the four trained models' α = 0 (LoRA's baseline and its evaluation's α = 0: one model) and the zero-shot run
    assert frontier.zero_shot_count == 5
    table = results.frontier_table(frontier)
    assert table.header == [
        "method",
        "runs",
        "best ID at",
        "best ID",
        "OOD at +50 %",
        "OOD at +75 %",
        "OOD at +100 %",
    ]
    rows = {row[0]: row[1:] for row in table.rows}
    # KRAdapter: the seeds' mean curve at lr 1e-3, (60, 50) (80, 56) (90, 41); best gain 30 over zero-shot.
    assert rows["kradapter"] == ["3", "lr=0.001, α=1", "90.0", "54.5", "52.2", "41.0"]
    # LoRA: its training run and the evaluation of its adapters make one curve (60, 50) (66, 53) (70, 52).
    assert rows["lora"] == ["1", "lr=0.001, α=1", "70.0", "52.5", "52.6", "52.0"]
    values = {(record["method"], record["column"]): float(record["mean"]) for record in table.records}
    assert values["kradapter", "OOD at +75 %"] == pytest.approx(52.25)
    assert values["lora", "OOD at +75 %"] == pytest.approx(52.625)
    assert "Zero-shot, the common origin: ID 60.0, OOD 50.0" in table.markdown()


def test_every_point_names_its_run_folder_and_the_files_it_was_read_from(sweep):
    rows = results.points_rows(results.frontiers(results.load_runs(sweep)))
    lora = [row for row in rows if row["method"] == "lora"]
    assert [row["alpha"] for row in lora] == [0.0, 0.5, 1.0]
    assert {row["run_folder"] for row in lora} == {str(sweep / "3")}
    assert lora[1]["read_from"] == str(sweep / "eval" / "metrics.json")
    assert lora[2]["read_from"] == str(sweep / "3" / "metrics.json")  # the training run's result first
    kradapter = [row for row in rows if row["method"] == "kradapter"]
    assert len(kradapter) == 8 and {row["swept"] for row in kradapter} == {"lr=0.001", "lr=0.01"}
    assert {(row["seed"], row["run_folder"]) for row in kradapter if row["swept"] == "lr=0.001"} == {
        (1, str(sweep / "0")),
        (2, str(sweep / "1")),
    }


def test_no_gain_without_a_better_id_or_without_zero_shot(tmp_path):
    worse = {0.0: (60.0, 50.0), 1.0: (55.0, 45.0)}
    digits_run(tmp_path / "worse", worse, test_by_scale=scales(worse))
    [frontier] = results.frontiers(results.load_runs(tmp_path))
    assert results.frontier_table(frontier).rows == [
        ["kradapter", "1", "lr=0.001, α=0", "60.0", "–", "–", "–"]
    ]

    no_zero_shot = {0.5: (65.0, 48.0), 1.0: (70.0, 45.0)}
    digits_run(tmp_path / "alone" / "run", no_zero_shot, test_by_scale=scales(no_zero_shot))
    [frontier] = results.frontiers(results.load_runs(tmp_path / "alone"))
    table = results.frontier_table(frontier)
    assert frontier.zero_shot is None and table.rows == [
        ["kradapter", "1", "lr=0.001, α=1", "70.0", "–", "–", "–"]
    ]
    assert "No zero-shot result among these runs" in table.markdown()


def test_aggregate_writes_the_frontier_beside_results_md(sweep):
    done = subprocess.run([sys.executable, SCRIPT, str(sweep)], capture_output=True, text=True, check=True)
    printed = done.stdout
    assert "### ID / OOD frontier, distribution_shift: digits, 16 shots, ViT-B-16" in printed
    frontier_md = (sweep / "frontier.md").read_text()
    assert (
        frontier_md.startswith("![")
        and "| kradapter | 3 | lr=0.001, α=1 | 90.0 | 54.5 | 52.2 | 41.0 |" in frontier_md
    )
    assert (sweep / "frontier.png").read_bytes().startswith(b"\x89PNG")
    with (sweep / "frontier_points.csv").open() as handle:
        points = list(csv.DictReader(handle))
    assert len(points) == 8 + 3 + 1 and set(points[0]) == set(results.POINTS_FIELDS)
    with (sweep / "results.csv").open() as handle:
        assert any(row["protocol"] == "frontier" for row in csv.DictReader(handle))
