"""kr_vlm.results: the protocol summary of a run, and the four tables from folders of metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kr_vlm import results
from metrics_files import write_run


def tables(folder: Path, references=()) -> dict[str, list[results.Table]]:
    by_protocol: dict[str, list[results.Table]] = {}
    for table in results.protocol_tables(results.measure(results.load_runs(folder)), references):
        by_protocol.setdefault(table.protocol, []).append(table)
    return by_protocol


def test_harmonic_mean_is_cocoops_h():
    assert results.harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    assert results.harmonic_mean(0.0, 0.0) == 0.0


def test_protocol_summary_of_each_protocol():
    test = {name: {"top1": value} for name, value in {"a_base": 0.8, "a_new": 0.6}.items()}
    summary = results.protocol_summary(test, {"a_base": "base", "a_new": "new"})
    assert summary["base_to_new"] == {"base": 0.8, "new": 0.6, "hm": pytest.approx(0.6857142857)}
    assert summary["test_roles"] == {"a_base": "base", "a_new": "new"}

    test = {name: {"top1": value} for name, value in {"a": 0.9, "a_x": 0.5, "a_y": 0.3, "b": 0.2}.items()}
    roles = {"a": "source", "a_x": "shift", "a_y": "shift", "b": "cross"}
    summary = results.protocol_summary(test, roles)
    # The source is not averaged with the targets.
    shift = summary["distribution_shift"]
    assert shift["source"] == 0.9 and shift["target_average"] == pytest.approx(0.4)
    assert shift["targets"] == {"a_x": 0.5, "a_y": 0.3}
    assert summary["cross_dataset"] == {"source": 0.9, "targets": {"b": 0.2}, "target_average": 0.2}
    assert "base_to_new" not in summary
    assert results.protocol_summary({"a": {"top1": 0.9}}, {"a": "source"}) == {"test_roles": {"a": "source"}}


def test_few_shot_table_has_mean_std_seeds_and_an_average_over_complete_rows(tmp_path):
    for seed, (dtd, eurosat) in enumerate([(0.4, 0.7), (0.5, 0.7), (0.6, 0.7)], start=1):
        write_run(tmp_path / f"d{seed}", {"dtd": dtd}, {"dtd": "source"}, seed=seed)
        write_run(
            tmp_path / f"e{seed}", {"eurosat": eurosat}, {"eurosat": "source"}, dataset="eurosat", seed=seed
        )
    write_run(tmp_path / "lora", {"dtd": 0.3}, {"dtd": "source"}, method="lora")
    (table,) = tables(tmp_path)["few_shot"]
    assert table.header == ["method", "shots", "seeds", "dtd", "eurosat", "Average"]
    assert table.rows == [
        ["kradapter", "16", "3", "50.0 ± 10.0", "70.0 ± 0.0", "60.0"],
        ["lora", "16", "1", "30.0", "–", "–"],  # one seed: no ±; no eurosat run: no average
    ]


def test_an_evaluation_of_a_training_run_is_not_another_seed(tmp_path):
    train = write_run(tmp_path / "sweep" / "0", {"dtd": 0.5}, {"dtd": "source"}, seed=2)
    write_run(tmp_path / "sweep" / "1", {"dtd": 0.7}, {"dtd": "source"}, seed=3)
    # Re-evaluated from its adapters, and from a checkpoint (older metrics.json: the path in the config only).
    write_run(tmp_path / "evals" / "a", {"dtd": 0.5}, {"dtd": "source"}, evaluation_of=train / "adapters")
    old_style = write_run(
        tmp_path / "evals" / "b", {"dtd": 0.5}, evaluation_of=train / "checkpoints" / "last.ckpt"
    )
    metrics = json.loads((old_style / "metrics.json").read_text())
    del metrics["adapters_from"]
    (old_style / "metrics.json").write_text(json.dumps(metrics))

    measurements = results.measure(results.load_runs(tmp_path))
    assert measurements.duplicates == 2
    (table,) = results.protocol_tables(measurements)
    assert table.rows == [["kradapter", "16", "2", "60.0 ± 14.1", "60.0"]]


def test_an_evaluation_on_new_test_sets_adds_them_to_its_training_run(tmp_path):
    # CoCoOp's way: train on the base classes, evaluate the new ones with eval.py; and transfer to another dataset.
    train = write_run(tmp_path / "train", {"dtd_base": 0.8}, {"dtd_base": "base"}, seed=2)
    write_run(tmp_path / "new", {"dtd_new": 0.6}, {"dtd_new": "new"}, evaluation_of=train / "adapters")
    write_run(
        tmp_path / "xd",
        {"eurosat": 0.3},
        {"eurosat": "source"},
        dataset="eurosat",
        evaluation_of=train / "adapters",
    )
    by_protocol = tables(tmp_path)
    (base_to_new,) = by_protocol["base_to_new"]
    assert base_to_new.rows[0] == ["dtd", "kradapter", "16", "1", "80.0", "60.0", "68.6"]
    (cross,) = by_protocol["cross_dataset"]
    assert cross.title.startswith("Cross-dataset transfer: trained on dtd")
    assert cross.rows == [["kradapter", "16", "1", "–", "30.0", "30.0"]]
    assert "few_shot" not in by_protocol  # trained on half the classes: not a few-shot result


def test_an_evaluation_of_unknown_adapters_is_a_model_of_its_own(tmp_path, caplog):
    write_run(
        tmp_path / "eval", {"dtd": 0.5}, {"dtd": "source"}, evaluation_of=tmp_path / "gone" / "adapters"
    )
    measurements = results.measure(results.load_runs(tmp_path))
    assert "the training run of" in caplog.text and "was not found" in caplog.text
    assert len(measurements.values) == 1


def test_runs_that_differ_in_their_recipe_are_rows_labelled_by_the_difference(tmp_path):
    write_run(tmp_path / "a", {"dtd": 0.5}, {"dtd": "source"}, lr=2e-4)
    write_run(tmp_path / "b", {"dtd": 0.6}, {"dtd": "source"}, lr=1e-3)
    write_run(tmp_path / "c", {"dtd": 0.7}, {"dtd": "source"}, method="lora")
    (table,) = tables(tmp_path)["few_shot"]
    assert [row[0] for row in table.rows] == ["kradapter (lr=0.0002)", "kradapter (lr=0.001)", "lora"]


def test_runs_of_two_schedules_or_clippings_are_two_rows(tmp_path):
    # The authors' recipe differs from CLIP-LoRA's in trainer and data settings, not only in model.*.
    write_run(tmp_path / "a", {"dtd": 0.5}, {"dtd": "source"})
    clipped = write_run(tmp_path / "b", {"dtd": 0.6}, {"dtd": "source"})
    metrics = json.loads((clipped / "metrics.json").read_text())
    metrics["config"]["trainer"]["gradient_clip_val"] = 1.0
    metrics["config"]["data"]["min_iterations_per_epoch"] = 10
    (clipped / "metrics.json").write_text(json.dumps(metrics))
    (table,) = tables(tmp_path)["few_shot"]
    assert len(table.rows) == 2
    assert any("gradient_clip_val=1.0" in row[0] for row in table.rows)


def test_base_to_new_table_averages_base_and_new_then_takes_the_hm(tmp_path):
    for seed, (base, new) in enumerate([(0.8, 0.6), (0.9, 0.5)], start=1):
        write_run(
            tmp_path / f"d{seed}",
            {"dtd_base": base, "dtd_new": new},
            {"dtd_base": "base", "dtd_new": "new"},
            seed=seed,
        )
    write_run(
        tmp_path / "e",
        {"eurosat_base": 0.6, "eurosat_new": 0.2},
        {"eurosat_base": "base", "eurosat_new": "new"},
        dataset="eurosat",
    )
    (table,) = tables(tmp_path)["base_to_new"]
    assert table.header == ["dataset", "method", "shots", "seeds", "base", "new", "HM"]
    assert table.rows == [
        ["dtd", "kradapter", "16", "2", "85.0 ± 7.1", "55.0 ± 7.1", "66.8"],
        ["eurosat", "kradapter", "16", "1", "60.0", "20.0", "30.0"],
        # base (85 + 60) / 2 = 72.5, new (55 + 20) / 2 = 37.5, HM 49.4
        ["Average", "kradapter", "16", "1–2", "72.5", "37.5", "49.4"],
    ]


def test_distribution_shift_averages_the_targets_without_the_source(tmp_path):
    roles = {"digits": "source", "digits_noisy": "shift", "digits_edges": "shift"}
    for seed, values in enumerate([(0.9, 0.6, 0.2), (0.7, 0.4, 0.2)], start=1):
        write_run(
            tmp_path / str(seed), dict(zip(roles, values, strict=True)), roles, dataset="digits", seed=seed
        )
    by_protocol = tables(tmp_path)
    (shift,) = by_protocol["distribution_shift"]
    assert shift.header == [
        "method",
        "shots",
        "seeds",
        "digits",
        "digits_noisy",
        "digits_edges",
        "Target avg",
    ]
    assert shift.rows == [["kradapter", "16", "2", "80.0 ± 14.1", "50.0 ± 14.1", "20.0 ± 0.0", "35.0"]]
    # The same runs give the source's few-shot row.
    assert by_protocol["few_shot"][0].rows == [["kradapter", "16", "2", "80.0 ± 14.1", "80.0"]]


def test_old_metrics_without_test_roles_get_them_from_the_names(tmp_path):
    write_run(tmp_path / "0", {"digits": 0.9, "digits_noisy": 0.5, "glyphs": 0.3}, dataset="digits")
    run = results.load_runs(tmp_path)[0]
    assert run.test_roles() == {"digits": "source", "digits_noisy": "shift", "glyphs": "cross"}


def test_null_results_and_broken_files_are_left_out_with_a_warning(tmp_path, caplog):
    write_run(tmp_path / "0", {"dtd": None, "eurosat": 0.5}, {"dtd": "source", "eurosat": "cross"})
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "metrics.json").write_text('{"test": ')
    runs = results.load_runs(tmp_path)
    assert len(runs) == 1 and "not readable as JSON" in caplog.text
    measurements = results.measure(runs)
    assert "dtd has no finite top1" in caplog.text
    assert [sets for sets in measurements.values.values()] == [{"eurosat": ("cross", 50.0)}]


def test_published_rows_and_the_difference(tmp_path):
    write_run(tmp_path / "0", {"dtd": 0.7}, {"dtd": "source"}, shots=16)
    write_run(tmp_path / "1", {"dtd": 0.6}, {"dtd": "source"}, shots=4)
    (table,) = tables(tmp_path, results.load_references())["few_shot"]
    assert table.rows == [
        ["kradapter", "4", "1", "60.0", "60.0"],
        ["CLIP-LoRA (published)", "4", "", "63.9", "77.5"],
        ["Δ kradapter − CLIP-LoRA", "4", "", "-3.9", "–"],  # our average is over dtd alone
        ["kradapter", "16", "1", "70.0", "70.0"],
        ["CLIP-LoRA (published)", "16", "", "72.0", "82.9"],
        ["Δ kradapter − CLIP-LoRA", "16", "", "-2.0", "–"],
    ]
    assert table.notes == [f"CLIP-LoRA (published): {results.load_references()[0].source}"]


def test_no_published_row_for_these_datasets_is_said(tmp_path):
    write_run(tmp_path / "0", {"digits": 0.7}, {"digits": "source"}, dataset="digits")
    (table,) = tables(tmp_path, results.load_references())["few_shot"]
    assert len(table.rows) == 1
    assert table.notes[0].startswith(
        "No published row shares a column with these runs (published: caltech101, dtd,"
    )


def test_the_average_is_compared_when_the_runs_cover_the_published_datasets(tmp_path):
    published = next(ref for ref in results.load_references() if ref.shots == 1)
    datasets = [column for column in published.top1 if column != "Average"]
    for dataset in datasets:
        write_run(
            tmp_path / dataset,
            {dataset: published.top1[dataset] / 100 + 0.01},
            {dataset: "source"},
            dataset=dataset,
            shots=1,
        )
    (table,) = tables(tmp_path, [published])["few_shot"]
    assert table.rows[-1] == ["Δ kradapter − CLIP-LoRA", "1", "", *["+1.0"] * len(datasets), "+1.0"]


def test_shipped_references_cite_their_source_and_cover_the_11_datasets():
    references = results.load_references()
    assert sorted(ref.shots for ref in references) == [1, 2, 4, 8, 16]
    for reference in references:
        assert reference.protocol == "few_shot" and "github.com/MaxZanella/CLIP-LoRA" in reference.source
        assert len(reference.top1) == 12  # the 11 datasets and their published average
        datasets = [value for column, value in reference.top1.items() if column != "Average"]
        assert reference.top1["Average"] == pytest.approx(sum(datasets) / 11, abs=0.1)


def test_a_reference_file_with_an_unknown_protocol_is_an_error(tmp_path):
    path = tmp_path / "refs.json"
    path.write_text(
        json.dumps({"references": [{"name": "X", "protocol": "zero_shot", "source": "s", "rows": {}}]})
    )
    with pytest.raises(ValueError, match="unknown protocol 'zero_shot' of 'X'"):
        results.load_references(path)
