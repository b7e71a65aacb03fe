"""Published zero-shot rows beside ours (`kr_vlm.results.published`, `aggregate_results.py --reference`) and the
22-dataset table of the KRAdapter / RandLoRA papers (`kr_vlm.results.atlas`)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from compose_helpers import compose_config, run_state_restored
from kr_vlm import cli, results
from kr_vlm.atlas_names import ATLAS22, ATLAS_NAMES
from kr_vlm.results import published
from kr_vlm.results.atlas import atlas22_dataset_table, atlas22_summary_table
from metrics_files import write_run, write_zero_shot_eval

REPO = Path(__file__).resolve().parents[1]


def measured(folder: Path) -> results.Measurements:
    return results.measure(results.load_runs(folder))


def test_the_shipped_tables_hold_what_their_sources_say():
    openclip = {(row.model, row.pretrained): row for row in published.load_openclip_table()}
    vit_b_32 = openclip[("ViT-B-32", "openai")]
    # docs/openclip_classification_results.csv: MNIST 0.4839, CIFAR-10 0.8983, ImageNet 1k 0.6332.
    assert vit_b_32.top1["mnist"] == pytest.approx(48.39)
    assert (
        vit_b_32.top1["cifar10"] == vit_b_32.top1["clip_benchmark/wds/vtab/cifar10"] == pytest.approx(89.83)
    )
    assert vit_b_32.top1["imagenet"] == vit_b_32.top1["imagenet_atlas"] == pytest.approx(63.32)
    assert "oxford_flowers" not in vit_b_32.top1  # CoOp's Flowers102 tests on other images than the official
    assert len(openclip) == 121
    atlas = {row.model: row for row in published.load_atlas_table()}
    assert set(atlas) == {"RN50", "RN101", "ViT-B-32", "ViT-B-16", "ViT-L-14"}
    # checkpoints/ViT-B-32/zeroshot_accuracies.json: "MNIST": 0.4825, "Cars": 0.5973...
    assert atlas["ViT-B-32"].top1["mnist"] == pytest.approx(48.25)
    assert atlas["ViT-B-32"].top1["stanford_cars_atlas"] == pytest.approx(59.73137669444099)
    assert set(atlas["ViT-B-32"].top1) == set(ATLAS22) and atlas["ViT-B-32"].pretrained == "openai"
    about = json.loads(
        (REPO / "src/kr_vlm/results/published_tables/openclip_classification_results.about.json").read_text()
    )
    assert about["repository_commit"] and about["source"].startswith(
        "https://github.com/mlfoundations/open_clip"
    )


def test_models_match_by_name_and_pretrained_tag():
    row = published.PublishedZeroShot("open_clip", "ViT-B-32-quickgelu", "openai", {}, "")
    assert published.same_model(("ViT-B-32", "openai"), row)
    assert not published.same_model(("ViT-B-32", "laion2b_s34b_b79k"), row)
    assert not published.same_model(("ViT-B-16", "openai"), row)


def test_zero_shot_runs_get_the_published_rows_of_their_model_with_the_difference(tmp_path):
    write_zero_shot_eval(tmp_path / "mnist", {"mnist": 0.50}, eval_templates="clip_benchmark")
    write_zero_shot_eval(tmp_path / "cifar10", {"cifar10": 0.90}, eval_templates="clip_benchmark")
    write_zero_shot_eval(tmp_path / "mnist_atlas", {"mnist": 0.4825})
    write_zero_shot_eval(tmp_path / "other", {"mnist": 0.7}, model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    write_zero_shot_eval(tmp_path / "nobody", {"mnist": 0.7}, model="kr-vlm-mini", pretrained="kr-vlm-mini")
    write_run(tmp_path / "trained", {"mnist": 0.99}, dataset="mnist", shots=16)  # not zero-shot: left out
    tables = published.zero_shot_tables(measured(tmp_path))
    assert [table.title.split(":")[0] for table in tables] == [
        "Zero-shot ViT-B-32 (laion2b_s34b_b79k)",
        "Zero-shot ViT-B-32 (openai)",
    ]
    table = tables[1]
    assert table.header == ["row", "cifar10", "mnist"]
    rows = {row[0]: row[1:] for row in table.rows}
    assert rows["zero-shot (eval_templates=atlas)"] == ["–", "48.2"]
    assert rows["zero-shot (eval_templates=clip_benchmark)"] == ["90.0", "50.0"]
    assert rows["open_clip (published)"] == ["89.8", "48.4"]
    assert rows["Δ zero-shot (eval_templates=clip_benchmark) − open_clip"] == ["+0.2", "+1.6"]
    assert rows["aTLAS (published)"] == ["89.8", "48.2"]  # aTLAS's ViT-B-32: CIFAR10 0.8983, MNIST 0.4825
    assert rows["Δ zero-shot (eval_templates=atlas) − aTLAS"] == ["–", "+0.0"]
    assert any("openclip_classification_results.csv" in note for note in table.notes)


def test_a_fabricated_zero_shot_run_is_written_as_a_real_zero_shot_evaluation(tmp_path):
    with run_state_restored():
        cli.evaluate(
            compose_config(
                tmp_path, ["experiment=mini_zeroshot", "data=digits", "data.num_workers=0"], "eval"
            )
        )
    real = json.loads((tmp_path / "run" / "metrics.json").read_text())
    fake = json.loads((write_zero_shot_eval(tmp_path / "fake", {"mnist": 0.5}) / "metrics.json").read_text())
    assert set(fake) == set(real)
    for key in ("method", "shots", "tested", "adapters_from", "trainable_params", "steps"):
        assert fake[key] == real[key], key
    for section in ("data", "model"):
        assert set(fake["config"][section]) <= set(real["config"][section]), section
    assert set(fake["config"]["model"]["clip"]) <= set(real["config"]["model"]["clip"])


@pytest.mark.slow
def test_aggregate_results_reference_shows_the_open_clip_row_beside_a_zero_shot_run(tmp_path):
    sweep = tmp_path / "logs" / "atlas_zeroshot" / "eval_multiruns" / "2026-12-07_10-00-00"
    write_zero_shot_eval(
        sweep / "0", {"mnist": 0.50}, eval_templates="clip_benchmark", classnames="clip_benchmark"
    )
    write_zero_shot_eval(
        sweep / "1", {"pascal_voc": 0.80}, eval_templates="clip_benchmark", classnames="clip_benchmark"
    )
    done = subprocess.run(
        [sys.executable, "scripts/aggregate_results.py", str(sweep), "--reference"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "### Zero-shot ViT-B-32 (openai): top-1 % of our runs beside the published ones" in done.stdout
    # open_clip's ViT-B-32 openai: MNIST 0.4839, Pascal VOC 2007 0.7640.
    assert "| open_clip (published) | 48.4 | 76.4 |" in lines
    assert "| Δ zero-shot − open_clip | +1.6 | +3.6 |" in lines
    assert "| aTLAS (published) | 48.2 | 76.2 |" in lines
    assert (sweep / "results.md").read_text().count("open_clip (published)") == 1


def _atlas22_runs(folder: Path, method: str, top1: float, skip: str | None = None, fraction=None) -> None:
    for index, dataset in enumerate(ATLAS22):
        if dataset != skip:
            run = folder / f"{method}-{fraction}-{index}"
            write_run(run, {dataset: top1 + index / 1000}, dataset=dataset, method=method, fraction=fraction)


def test_the_22_dataset_table_and_its_average(tmp_path):
    _atlas22_runs(tmp_path, "kradapter", 0.80)
    _atlas22_runs(tmp_path, "kradapter", 0.90, fraction=0.5)
    _atlas22_runs(tmp_path, "lora", 0.70, skip="mnist")
    measurements = measured(tmp_path)
    summary = atlas22_summary_table(measurements)
    assert summary.header == ["method", "16 shots", "50 %"]
    # The mean of 80.0, 80.1, ..., 82.1 over the 22 datasets is 81.05; LoRA lacks MNIST: no average.
    average = f"{statistics.fmean(100 * (0.80 + index / 1000) for index in range(22)):.1f}"
    half = f"{statistics.fmean(100 * (0.90 + index / 1000) for index in range(22)):.1f}"
    assert summary.rows == [["kradapter", average, half], ["lora", "–", "–"]]
    table = atlas22_dataset_table(measurements)
    assert (
        table.header[3:-1] == [ATLAS_NAMES[name] for name in ATLAS22] and table.header[-1] == "Average (22)"
    )
    rows = {(row[0], row[1]): row for row in table.rows}
    assert rows[("kradapter", "50 %")][3] == "90.0" and rows[("kradapter", "16 shots")][-1] == average
    assert rows[("lora", "16 shots")][3 + ATLAS22.index("mnist")] == "–"


@pytest.mark.slow
def test_the_atlas22_sweep_runs_each_dataset_and_aggregates_them(tmp_path):
    """`sweep=atlas22` with its dataset list narrowed to two fabricated ones, on the demo recipe, and shots
    swept on the command line as the README's line does."""
    from atlas_layout import make_atlas_dataset

    for name in ("mnist", "dtd_atlas"):
        make_atlas_dataset(tmp_path / "data", name, classes=3, per_class=4)
    swept = subprocess.run(
        [sys.executable, "train.py", "-m", "experiment=demo", "sweep=atlas22", "hydra.sweeper.params.data='mnist,dtd_atlas'",
         "data.shots=1,2", "trainer.max_steps=2", "data.num_workers=0", "~callbacks.rank_monitor",
         f"paths.root_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert swept.returncode == 0, swept.stderr[-3000:]
    runs = sorted((tmp_path / "logs" / "demo" / "multiruns").rglob("metrics.json"))
    # The config's dataset list and the command line's shots combine: one job a dataset and shot count.
    jobs = sorted(
        (json.loads(path.read_text())["dataset"], json.loads(path.read_text())["shots"]) for path in runs
    )
    assert jobs == [("dtd_atlas", 1), ("dtd_atlas", 2), ("mnist", 1), ("mnist", 2)]
    sweep_folder = runs[0].parents[1]
    done = subprocess.run(
        [sys.executable, "scripts/aggregate_results.py", str(sweep_folder)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "aTLAS's 22 datasets: average top-1 % over the 22" in done.stdout
    assert "| kradapter | – |" in done.stdout  # 2 of the 22: no average
