"""The mini benchmark (`kr_vlm.benchmarks.mini`, `scripts/mini_benchmark.py`): the rate choice and the
widening on fabricated records with known answers, the schedule, the report on fabricated run folders,
the runs' configs, and a --quick run from a fresh copy of the repository (the tiny random CLIP, two steps a
run). The full benchmark is a script, never a test."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from compose_helpers import TINY_MODEL, compose_config, path_overrides, run_state_restored
from kr_vlm.adapters import count_parameters
from kr_vlm.benchmarks import mini
from kr_vlm.benchmarks.mini import runner
from kr_vlm.benchmarks.mini.plan import BenchmarkPlan
from kr_vlm.benchmarks.mini.selection import LOWER, UPPER
from kr_vlm.callbacks.divergence import TrainingDivergedError
from kr_vlm.cli.build import build_model
from kr_vlm.errors import ConfigError
from metrics_files import write_run
from test_cli import repository_copy, run_in


@pytest.fixture(autouse=True)
def _clear_hydra():
    with run_state_restored():
        yield


def runs(values: dict[float, list[float | None]]) -> list[dict]:
    """Selection records: {lr: validation top-1 of seeds 1, 2, ... (None: diverged)}."""
    return [
        {"lr": lr, "seed": seed, **({"error": "nan"} if value is None else {"val_top1": value})}
        for lr, seeds in values.items()
        for seed, value in enumerate(seeds, start=1)
    ]


# ---------------------------------------------------------------------------------------- rate choice


def test_the_rate_is_chosen_on_the_mean_over_seeds_not_on_one_seed():
    # Seed 1 alone would pick 1e-3; the mean over the three seeds picks 2e-3.
    choice = mini.choose_rate(
        runs({1e-3: [0.95, 0.80, 0.80], 2e-3: [0.90, 0.90, 0.90], 4e-3: [0.5] * 3}), (1, 2, 3)
    )
    assert choice.chosen == 2e-3 and choice.edge is None
    assert [score.mean for score in choice.scores] == pytest.approx([0.85, 0.90, 0.5])


def test_a_tie_goes_to_the_smaller_rate_and_a_rate_that_diverged_once_is_never_chosen():
    tie = mini.choose_rate(
        runs({1e-3: [0.5, 0.5], 2e-3: [0.9, 0.7], 4e-3: [0.8, 0.8], 8e-3: [0.2, 0.2]}), (1, 2)
    )
    assert tie.chosen == 2e-3  # 2e-3 and 4e-3 both average 0.8 (in floating point, 0.8 and 0.7999...)
    diverged = mini.choose_rate(runs({1e-3: [0.5, 0.5], 2e-3: [0.99, None], 4e-3: [0.6, 0.6]}), (1, 2))
    assert diverged.chosen == 4e-3 and diverged.scores[1].mean is None and diverged.scores[1].diverged == 1
    # The rate that diverged still counts as tried: 4e-3 is at the upper edge, 2e-3 would not be.
    assert diverged.edge == UPPER
    nothing = mini.choose_rate(runs({1e-3: [None], 2e-3: [None]}), (1,))
    assert nothing.chosen is None and nothing.edge is None and mini.next_rate_out(nothing, 2.0) is None


def test_a_pick_at_an_edge_is_detected_and_the_next_rate_out_is_one_grid_step_beyond():
    lower = mini.choose_rate(runs({2.5e-3: [0.9], 5e-3: [0.8], 1e-2: [0.7]}), (1,))
    upper = mini.choose_rate(runs({2.5e-3: [0.7], 5e-3: [0.8], 1e-2: [0.9]}), (1,))
    inside = mini.choose_rate(runs({2.5e-3: [0.7], 5e-3: [0.9], 1e-2: [0.8]}), (1,))
    assert (lower.edge, upper.edge, inside.edge) == (LOWER, UPPER, None)
    assert mini.next_rate_out(lower, 2.0) == 1.25e-3 and mini.next_rate_out(upper, 2.0) == 2e-2
    assert mini.next_rate_out(inside, 2.0) is None
    # A rate reached by widening is the same float as the grid's own (7.5e-4 x 2 x 2 = 3e-3).
    assert mini.next_rate_out(mini.choose_rate(runs({7.5e-4: [0.1], 1.5e-3: [0.9]}), (1,)), 2.0) == 3e-3


# ------------------------------------------------------------------------------------------- the plan

SETTINGS = mini.Settings(
    methods=("zero_shot", "kradapter"), seeds=(1, 2), grid_exponents=(0, 1), recipes=("clip_lora",)
)


def finish(plan: BenchmarkPlan, jobs, val_top1) -> list:
    """Feed `plan` a record for each job (its validation top-1 from `val_top1(job)`); the jobs it adds."""
    added = []
    for job in jobs:
        added += plan.finished({**dataclasses.asdict(job), "folder": job.folder, "val_top1": val_top1(job)})
    return added


def test_the_plan_widens_the_grid_until_the_pick_is_inside():
    plan = BenchmarkPlan(dataclasses.replace(SETTINGS, shots=(4, 16)))
    first = plan.first_jobs()
    grid = [job for job in first if job.shots == 16]
    assert {(job.lr, job.protocol, job.seed) for job in grid} == {
        (lr, protocol, seed)
        for lr in (5e-3, 1e-2)
        for protocol in ("few_shot", "base_to_new")
        for seed in (1, 2)
    }
    assert [job.protocol for job in grid] == ["few_shot"] * 4 + ["base_to_new"] * 4  # the choice's runs first
    # 4 shots at the fixed rate from the start; zero-shot for each protocol.
    assert {(job.shots, job.lr) for job in first if job.shots != 16} == {(4, 5e-3), (0, None)}
    scores = {5e-3: 0.5, 1e-2: 0.8, 2e-2: 0.9, 4e-2: 0.7}

    def val(job):
        return scores[job.lr]

    few_shot = [job for job in grid if job.protocol == "few_shot"]
    assert finish(plan, few_shot[:-1], val) == []  # the choice waits for every rate and seed
    widened = finish(plan, few_shot[-1:], val)
    assert {(job.lr, job.protocol) for job in widened} == {(2e-2, "few_shot"), (2e-2, "base_to_new")}
    assert len(widened) == 4 and "kradapter" not in plan.final
    again = finish(plan, [job for job in widened if job.protocol == "few_shot"], val)
    assert {job.lr for job in again} == {4e-2}
    done = finish(plan, [job for job in again if job.protocol == "few_shot"], val)
    # 2e-2 is inside 5e-3 .. 4e-2: chosen; its 4-shot runs follow (the fixed rate's were queued already).
    assert {(job.shots, job.lr, job.protocol) for job in done} == {(4, 2e-2, "few_shot")}
    entry = plan.selection()["kradapter"]
    assert (entry["chosen"], entry["edge"], entry["widenings"], entry["limit_reached"]) == (
        2e-2,
        None,
        2,
        False,
    )
    assert entry["rates"] == [5e-3, 1e-2, 2e-2, 4e-2] and entry["grid"] == [5e-3, 1e-2]


def test_the_widening_stops_at_its_limit_and_says_so():
    plan = BenchmarkPlan(dataclasses.replace(SETTINGS, max_widening=1))
    grid = [job for job in plan.first_jobs() if job.protocol == "few_shot" and job.lr is not None]
    widened = finish(plan, grid, lambda job: job.lr)  # the larger the rate, the better
    assert finish(plan, [job for job in widened if job.protocol == "few_shot"], lambda job: job.lr) == []
    entry = plan.selection()["kradapter"]
    assert (entry["chosen"], entry["edge"], entry["widenings"], entry["limit_reached"]) == (
        2e-2,
        UPPER,
        1,
        True,
    )


def test_the_runner_runs_widening_jobs_before_the_rest_of_the_queue(tmp_path, monkeypatch):
    """With one worker (in this process) and a fake train task: the next rate out of an edge goes ahead
    of the authors' runs queued from the start, and the results hold the choice and every run."""

    def fake_run_job(job, runs_dir, settings):
        record = {**dataclasses.asdict(job), "folder": job.folder, "test": {}, "wall_time_s": 0.0}
        return record | ({"val_top1": job.lr} if job.lr is not None and job.recipe == "clip_lora" else {})

    monkeypatch.setattr(runner, "run_job", fake_run_job)
    settings = dataclasses.replace(SETTINGS, recipes=mini.RECIPES, workers=1, max_widening=1)
    lines: list[str] = []
    results = mini.run_benchmark(settings, tmp_path / "runs", log=lines.append)
    order = [(run["recipe"], run["protocol"], run["lr"]) for run in results["runs"]]
    first_widened = order.index(("clip_lora", "few_shot", 2e-2))
    assert first_widened < order.index(("authors", "few_shot", 1e-3))
    assert (
        results["selection"]["kradapter"]["chosen"] == 2e-2 and results["timing"]["runs"] == len(order) == 20
    )
    assert "kradapter: lr 0.02 chosen, at the upper edge (widening limit)" in "\n".join(lines)


def test_settings_that_cannot_run_are_config_errors_naming_the_option(tmp_path):
    for settings, option in [
        (mini.Settings(methods=("lorra",)), "--methods"),
        (mini.Settings(shots=(1, 4)), "--shots"),
        (mini.Settings(grid_exponents=(1, 2)), "--grid"),
        (mini.Settings(alphas=(0.5,)), "--alphas"),
        (mini.Settings(val_shots=0), "--val-shots"),
    ]:
        with pytest.raises(ConfigError, match=option):
            settings.check()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match="not empty"):
        mini.run_benchmark(mini.Settings(methods=("zero_shot",)), tmp_path / "runs")


# ------------------------------------------------------------------------------------------ the configs


def test_the_fixed_and_authors_rates_are_the_recipes_own(tmp_path):
    fewshot = compose_config(tmp_path, ["experiment=mini_kr_fewshot"])
    authors = compose_config(tmp_path, ["experiment=mini_kr_randlora"])
    assert (
        fewshot.model.optimizer.lr == mini.FIXED_LR and fewshot.trainer.max_steps == 2 * mini.protocol.STEPS
    )
    assert mini.METHODS_BY_KEY["kradapter"].authors_lr == authors.model.optimizer.lr
    assert [mini.max_steps(shots) for shots in (1, 4, 16)] == [7, 25, 100]  # CLIP-LoRA's 500 x shots, scaled
    assert authors.model.scheduler.min_lr == authors.model.optimizer.lr / 100
    assert pytest.approx(3e-5 * mini.FIXED_LR / 2e-4) == mini.FULL_FIXED_LR


@pytest.mark.parametrize(
    ("job", "expected"),
    [
        (
            mini.Job("clip_lora", "kradapter", "few_shot", 16, 2, 1e-2),
            {"model.optimizer.lr": 1e-2, "trainer.max_steps": 100, "data.val_shots": 16, "seed": 2},
        ),
        (
            mini.Job("authors", "vera", "base_to_new", 16, 3, 1e-2),
            {
                "model.scheduler.min_lr": 1e-4,
                "model.loss": "caption_contrastive",
                "data.subsample": "base_to_new",
            },
        ),
        (
            mini.Job("authors", "zero_shot", "few_shot", 0, 1, None),
            {"adapter.method": "none", "data.shots": 0},
        ),
    ],
)
def test_each_job_composes_to_its_recipe_with_the_benchmark_s_settings(job, expected, tmp_path):
    cfg = compose_config(tmp_path, mini.job_overrides(job, mini.Settings()))
    assert {key: OmegaConf.select(cfg, key) for key in expected} == expected
    if job.lr is not None:
        assert list(cfg.adapter_scales) == list(mini.ALPHAS)
    if job.protocol == "few_shot":
        assert list(cfg.data.test_sets) == [*mini.SHIFT_SETS, *mini.CROSS_SETS]
    build_model(cfg)  # the authors' zero-shot: adapter=none with the recipe's layers dropped


def test_methods_adapt_the_same_six_linears_at_about_kradapter_s_budget(tmp_path):
    """Every method but CLIP-LoRA's placement adapts q k v o fc1 fc2 of both towers; the low-rank ones
    train within 12 % of KRAdapter's count on the miniature CLIP (VeRA cannot, full fine-tuning trains all)."""
    counts, layers = {}, {}
    for method in mini.BENCHMARK_METHODS:
        if not method.trains:
            continue
        cfg = compose_config(tmp_path, ["experiment=mini_kr_fewshot", *method.overrides])
        layers[method.key] = list(cfg.adapter.targets.layers)
        counts[method.key] = count_parameters(build_model(cfg))[0]
    six = ["q", "k", "v", "o", "fc1", "fc2"]
    assert {key: value for key, value in layers.items() if value != six} == {"lora_qkv": ["q", "k", "v"]}
    budget = counts["kradapter"]
    for key in ("lora", "dora", "lokr", "loha", "randlora"):
        assert abs(counts[key] - budget) <= 0.12 * budget, (key, counts[key], budget)
    assert counts["vera"] < budget < counts["full"]


def test_a_diverged_run_is_recorded_not_raised(tmp_path, monkeypatch):
    def diverge(cfg):
        raise TrainingDivergedError("the loss is nan at step 1")

    monkeypatch.setattr("kr_vlm.cli.train", diverge)
    settings = mini.Settings(overrides=(*TINY_MODEL, *path_overrides(tmp_path)[:4]))
    record = mini.run_job(
        mini.Job("clip_lora", "kradapter", "few_shot", 16, 1, 1.0), str(tmp_path / "runs"), settings
    )
    assert record["error"] == "the loss is nan at step 1" and record["lr"] == 1.0


# ----------------------------------------------------------------------------------------- the report

ROLES = {"digits": "source", **dict.fromkeys(mini.SHIFT_SETS, "shift"), "glyphs": "cross"}
SHIFT_OFFSETS = (0.02, -0.02, 0.04, -0.04)  # the shifted domains around their mean


def fabricated_top1(job) -> dict[str, dict[str, float]]:
    """Known top-1 by update scale: zero-shot's, and at α = 1 a function of the rate (ID up, OOD down)."""
    zero = {"digits": 0.70, "shift": 0.60, "glyphs": 0.90, "base": 0.80, "new": 0.85}
    if job.lr is None:
        at = {1.0: zero}
    else:
        lr, seed = job.lr, -0.01 if job.seed == 1 else 0.01
        trained = {"digits": 0.8 + 5 * lr + seed, "shift": 0.6 - 5 * lr, "glyphs": 0.9 - 10 * lr}
        trained |= {"base": 0.85 + 5 * lr, "new": 0.85 - 10 * lr}
        at = {0.5: {key: (value + zero[key]) / 2 for key, value in trained.items()}, 1.0: trained}
    tests = {}
    for alpha, top1 in at.items():
        if job.protocol == "base_to_new":
            tests[alpha] = {"digits_base": top1["base"], "digits_new": top1["new"]}
        else:
            shifts = {
                name: top1["shift"] + offset
                for name, offset in zip(mini.SHIFT_SETS, SHIFT_OFFSETS, strict=True)
            }
            tests[alpha] = {"digits": top1["digits"], **shifts, "glyphs": top1["glyphs"]}
    return tests


def fabricated_val(job) -> float:
    """KRAdapter peaks at 1e-2 (inside after one widening); LoRA ties everywhere (the smallest wins,
    at the lower edge until the widening limit)."""
    if job.method == "lora":
        return 0.9
    return {5e-3: 0.8, 1e-2: 0.9, 2e-2: 0.8}[job.lr]


def fabricated_benchmark(runs_dir: Path) -> dict:
    """A benchmark's results whose runs are metrics.json files as train.py writes them, made by the plan."""
    settings = dataclasses.replace(SETTINGS, methods=("zero_shot", "kradapter", "lora"), recipes=mini.RECIPES)
    plan = BenchmarkPlan(settings)
    queue = plan.first_jobs()
    while queue:
        job = queue.pop(0)
        tests = fabricated_top1(job)
        roles = {"digits_base": "base", "digits_new": "new"} if job.protocol == "base_to_new" else ROLES
        by_scale = {
            f"{alpha:g}": {"test": {name: {"top1": v} for name, v in top1.items()}}
            for alpha, top1 in tests.items()
        }
        write_run(
            runs_dir / job.folder,
            tests[1.0],
            roles,
            method="none" if job.lr is None else job.method,
            dataset="digits",
            shots=job.shots,
            seed=job.seed,
            lr=job.lr,
            **({"test_by_scale": by_scale} if job.lr is not None else {}),
        )
        record = {
            **dataclasses.asdict(job),
            "folder": job.folder,
            "test": tests[1.0],
            "trainable_params": 0 if job.lr is None else 100,
        }
        if job.lr is not None and job.recipe == "clip_lora":
            record["val_top1"] = fabricated_val(job)
        queue[:0] = plan.finished(record)
    timing = {"wall_time_s": 60.0, "cpu_time_s": 100.0, "runs": len(plan.records)}
    timing |= {
        "load_average_before": [1.0] * 3,
        "load_average_after": [2.0] * 3,
        "load_1min_during": [1.0, 3.0],
    }
    machine = {"cpu": "a CPU", "cores": 2, "workers": 2, "torch": "2"}
    return {"date": "2026-12-07", "settings": dataclasses.asdict(settings), "selection": plan.selection()} | {
        "runs": plan.records,
        "timing": timing,
        "machine": machine,
    }


def test_the_report_reads_each_mode_s_runs_off_the_results_tables(tmp_path):
    benchmark = fabricated_benchmark(tmp_path / "runs")
    report = mini.Report(benchmark, tmp_path / "runs")
    chosen, fixed, authors = ({row[0]: row[1:] for row in table.rows} for table in report.summaries)
    # method: lr, params, digits (ID), shifted avg, glyphs, base, new, HM
    assert chosen["zero-shot"] == ["–", "0", "70.0", "60.0", "90.0", "80.0", "85.0", "82.4"]
    assert chosen["KRAdapter"] == [
        "0.01",
        "100",
        "85.0 ± 1.4",
        "55.0",
        "80.0 ± 0.0",
        "90.0 ± 0.0",
        "75.0 ± 0.0",
        "81.8",
    ]
    assert chosen["LoRA"][:2] == ["0.00125", "100"] and chosen["LoRA"][4] == "88.8 ± 0.0"
    assert fixed["KRAdapter"][:5] == ["0.005", "100", "82.5 ± 1.4", "57.5", "85.0 ± 0.0"]
    assert authors["KRAdapter"][:3] == ["0.001", "100", "80.5 ± 1.4"]
    rates = {row[0]: row for row in report.rates.rows}
    assert rates["KRAdapter"][4] == "0.005: 80.0 ± 0.0, **0.01: 90.0 ± 0.0**, 0.02: 80.0 ± 0.0"
    assert rates["KRAdapter"][5] == "0.01 (inside, after 1 widening)"
    assert rates["LoRA"][5] == "0.00125 (at the lower edge, after 2 widenings: widening limit reached)"

    paths = report.write(tmp_path / "out", "python scripts/mini_benchmark.py")
    markdown = paths["md"].read_text()
    assert "glyphs: KRAdapter 80.0 (2nd of 2), -10.0 against zero-shot's 90.0; LoRA 88.8" in markdown
    assert "below zero-shot: LoRA, KRAdapter" in markdown
    assert "still at an edge when the widening limit was reached: LoRA (0.00125, lower edge)" in markdown
    with paths["csv"].open(newline="") as handle:
        sections = {row["section"] for row in csv.DictReader(handle)}
    assert sections == {
        "summary_chosen",
        "summary_fixed",
        "summary_authors",
        "rates",
        "frontier_clip_lora",
        "frontier_authors",
        "runs_clip_lora",
        "runs_authors",
    }
    assert paths["frontier_clip_lora"].stat().st_size > 0 and paths["frontier_authors"].stat().st_size > 0
    # The frontier reads KRAdapter's curve through α (zero-shot, 0.5, 1) at the rate of its best ID.
    readings = report.frontier_readings()["cross_dataset"]["kradapter"]
    assert readings["best ID"] == pytest.approx(90.0) and readings["OOD at +100 %"] == pytest.approx(70.0)


# ----------------------------------------------------------------------------------- the command line


@pytest.mark.slow
def test_a_quick_run_from_a_fresh_copy_writes_every_mode_and_every_rate(tmp_path):
    """``--quick`` with two methods, the tiny random CLIP and two steps a run: the report's tables of the
    three modes, every rate tried, the frontier figures, and the runs as train.py writes them."""
    repo = repository_copy(tmp_path)
    out = tmp_path / "report"
    arguments = [
        "scripts/mini_benchmark.py",
        "--quick",
        "--methods",
        "zero_shot",
        "kradapter",
        "--out",
        str(out),
    ]
    done = run_in(repo, repo, *arguments, *TINY_MODEL, "trainer.max_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "mini_benchmark.json").read_text())
    markdown = (out / "mini_benchmark.md").read_text()
    titles = [line for line in markdown.splitlines() if line.startswith("### ")]
    assert [title.split(":")[0] for title in titles[:3]] == [
        "### CLIP-LoRA's recipe in miniature, each method at the rate chosen on the validation digits",
        "### CLIP-LoRA's recipe in miniature, one fixed rate for every adapter (full fine-tuning its own)",
        "### The KRAdapter / RandLoRA authors' recipe (mini_kr_randlora) at their fixed rates",
    ]
    selection = results["selection"]["kradapter"]
    assert selection["grid"] == [5e-3, 1e-2] and set(selection["grid"]) <= set(selection["rates"])
    rates_row = next(
        line for line in markdown.splitlines() if line.startswith("| KRAdapter | q k v o fc1 fc2")
    )
    assert all(f"{rate:g}: " in rates_row for rate in selection["rates"])
    assert (out / "mini_benchmark_frontier.png").stat().st_size > 0
    assert (out / "mini_benchmark_frontier_authors.png").stat().st_size > 0
    assert "## What the numbers say" in markdown and "load average" in markdown
    (runs_dir,) = (repo / "logs" / "mini_benchmark").iterdir()
    trained = json.loads(
        (runs_dir / "clip_lora/few_shot/kradapter/lr0.005/shots16_seed1/metrics.json").read_text()
    )
    assert sorted(trained["test_by_scale"]) == ["0.5", "1"] and trained["config"]["data"]["val_shots"] == 16
    assert trained["config"]["task_name"] == "mini_kr_fewshot" and trained["steps"] == 2
    assert {run["recipe"] for run in results["runs"]} == {"clip_lora", "authors"}
    assert "kradapter: lr" in done.stdout and "Run folder:" not in done.stdout
