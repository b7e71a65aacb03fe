"""The papers' evaluation in miniature: every method on the shipped miniature CLIP, offline, in one command.

``scripts/mini_benchmark.py`` runs it. Every run is the real train task (``kr_vlm.cli.train``) on a config
composed from ``configs/`` as ``python train.py experiment=mini_kr_fewshot adapter=<method> ...`` would compose
it, in a pool of worker processes (each imports kr_vlm once and then runs many configs in-process; one CPU
thread a run, as ``mini_kr_fewshot`` sets). Each run writes its usual folder (``metrics.json``,
``csv/metrics.csv``, ``adapters/``) under the runs folder; the tables are made from those.

The protocol:

- methods (`METHODS`): zero-shot, KRAdapter, LoRA, DoRA, VeRA, LoKr, LoHa, RandLoRA and full fine-tuning,
  all on the same six linears (q k v o fc1 fc2) of every block of both towers, and LoRA as CLIP-LoRA
  places it (q k v, r=2, alpha=1, rsLoRA, dropout 0.25). Budgets: each low-rank method's size is the one
  whose trainable count is closest to KRAdapter's (143,360 on the miniature); VeRA cannot reach it (it
  trains two vectors a layer) and keeps peft's r=256; full fine-tuning trains every weight of the six
  linears; CLIP-LoRA's placement keeps its published size. Each run's real count is in the tables.
  Scalings are each method's usual ones (KRAdapter s=2; LoRA and DoRA CLIP-LoRA's alpha=1 with rsLoRA;
  LoHa and LoKr alpha=r, peft's default ratio; RandLoRA alpha=20 r, peft's advice): with AdamW a constant
  scaling mostly changes the effective step size, which the learning-rate grid covers.
- recipe: ``mini_kr_fewshot`` (AdamW, weight decay 1e-2, cosine to 1e-6, batch 32, the model's learned
  logit scale, "a photo of a {}."), but half its 200 steps at 16 shots, so that the whole benchmark fits
  in 20 minutes on 2 cores; ``trainer.max_steps`` scales with the shots as CLIP-LoRA's 500 x shots does
  (`max_steps`: 7, 25, 100 at 1, 4, 16 shots). The learning-rate grid makes up for the shorter schedule.
- learning rate: one per method, chosen on the validation shots (4 a class of the digits' val split,
  never the test split) of 16-shot runs with seed 1, from the method's grid (`Method.lrs`): the highest
  validation top-1, ties to the lower validation loss; a run that diverged is never chosen. The chosen
  run is the seed-1 16-shot result (the grid runs are complete runs; selection reads their validation
  metrics only). The same rate serves 1, 4 and 16 shots (as CLIP-LoRA keeps one rate for all shots) and
  base-to-new, whose validation (digits 0-4) was not used: the rate was chosen with the validation
  images of all ten classes, never with a test image.
- few-shot (1, 4, 16 shots x seeds 1, 2, 3), trained on clean digits and tested in the same run on clean
  digits, on the four shifted digits domains (distribution shift) and on ``glyphs`` (digits and letters
  in the five fonts held out of the miniature's pretraining: cross-dataset transfer).
- base-to-new (CoCoOp's protocol, 16 shots x 3 seeds): trained on digits 0-4, tested on 0-4 (base) and
  5-9 (new), harmonic mean of the means.

Left out of every run, because they observe and never change training: the rank monitor (its SVDs),
checkpoints, the progress bar and the parameter table. The divergence stop stays.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from kr_vlm import metric_names
from kr_vlm.files import write_json_atomic, write_text_atomic
from kr_vlm.results import CSV_FIELDS, Cell, Table, harmonic_mean

SHOTS = (1, 4, 16)
SEEDS = (1, 2, 3)
# The learning rate is chosen on runs of this many shots and this seed.
SELECTION_SHOTS = 16
SELECTION_SEED = 1
# Base-to-new at CoCoOp's shot count.
BASE_TO_NEW_SHOTS = 16
# Half mini_kr_fewshot's 200 steps at 16 shots, so that the whole benchmark fits in 20 minutes on 2 cores.
STEPS, STEPS_SHOTS = 100, 16
SHIFT_SETS = ("digits_inverted", "digits_rotated", "digits_noisy", "digits_edges")
CROSS_SETS = ("glyphs",)
SOURCE = "digits"
FEW_SHOT, BASE_TO_NEW = "few_shot", "base_to_new"
# Every run: the mini recipe, CSV logs, and none of the callbacks that only observe.
BASE_OVERRIDES = (
    "experiment=mini_kr_fewshot",
    "data=digits",
    "logger=csv",
    "~callbacks.rank_monitor",
    "~callbacks.model_checkpoint",
    "~callbacks.progress_bar",
    "~callbacks.parameter_summary",
)
SIX_LINEARS = "q k v o fc1 fc2"


@dataclasses.dataclass(frozen=True)
class Method:
    """A row of the tables: Hydra overrides on top of `BASE_OVERRIDES`, and the learning rates to try."""

    key: str
    label: str
    linears: str
    overrides: tuple[str, ...]
    lrs: tuple[float, ...]  # empty: nothing trains (zero-shot)
    size: str  # the size and scaling, as the tables show them

    @property
    def trains(self) -> bool:
        return bool(self.lrs)


# A grid a factor of about 3 apart, wide enough that no method's pick was at its edge in the shipped run
# (the Markdown flags a pick at an edge). Full fine-tuning moves the pretrained weights themselves: its
# rates are 50-100x smaller (at the adapters' 5e-3 it stays at chance).
ADAPTER_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
FULL_LRS = (1e-5, 3e-5, 1e-4, 3e-4)
METHODS: tuple[Method, ...] = (
    Method("zero_shot", "zero-shot", "-", ("adapter=none",), (), "-"),
    Method(
        "kradapter",
        "KRAdapter",
        SIX_LINEARS,
        ("adapter=kradapter",),
        ADAPTER_LRS,
        "r = floor(sqrt(k)), s = 2",
    ),
    Method(
        "lora",
        "LoRA",
        SIX_LINEARS,
        ("adapter=lora", "adapter.options.r=10"),
        ADAPTER_LRS,
        "r=10, alpha=1, rsLoRA, dropout 0.25",
    ),
    Method(
        "lora_qkv",
        "LoRA (CLIP-LoRA: q k v, r=2)",
        "q k v",
        ("adapter=lora", "adapter.targets.layers=[q,k,v]"),
        ADAPTER_LRS,
        "r=2, alpha=1, rsLoRA, dropout 0.25",
    ),
    Method(
        "dora",
        "DoRA",
        SIX_LINEARS,
        ("adapter=dora", "adapter.options.r=10"),
        ADAPTER_LRS,
        "r=10, alpha=1, rsLoRA, dropout 0.25",
    ),
    Method("vera", "VeRA", SIX_LINEARS, ("adapter=vera",), ADAPTER_LRS, "r=256 (budget capped by design)"),
    Method(
        "lokr",
        "LoKr",
        SIX_LINEARS,
        (
            "adapter=lokr",
            "adapter.options.r=22",
            "adapter.options.alpha=22",
            "adapter.options.decompose_factor=2",
        ),
        ADAPTER_LRS,
        "r=22, alpha=22, decompose_factor=2",
    ),
    Method(
        "loha",
        "LoHa",
        SIX_LINEARS,
        ("adapter=loha", "adapter.options.r=5", "adapter.options.alpha=5"),
        ADAPTER_LRS,
        "r=5, alpha=5",
    ),
    Method(
        "randlora",
        "RandLoRA",
        SIX_LINEARS,
        ("adapter=randlora", "adapter.options.r=4", "adapter.options.randlora_alpha=80"),
        ADAPTER_LRS,
        "r=4, alpha=80 (20 r)",
    ),
    Method("full", "full fine-tuning", SIX_LINEARS, ("adapter=full",), FULL_LRS, "every weight"),
)
METHODS_BY_KEY = {method.key: method for method in METHODS}


def max_steps(shots: int) -> int:
    """`STEPS` at 16 shots, scaled with the shots as CLIP-LoRA's 500 x shots."""
    return math.ceil(STEPS * shots / STEPS_SHOTS)


# ------------------------------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class Job:
    """One training (or zero-shot) run of the benchmark."""

    method: str
    protocol: str  # FEW_SHOT or BASE_TO_NEW
    shots: int
    seed: int
    lr: float | None

    @property
    def folder(self) -> str:
        lr = "" if self.lr is None else f"_lr{self.lr:g}"
        return f"{self.protocol}/{self.method}/shots{self.shots}_seed{self.seed}{lr}"

    def overrides(self) -> list[str]:
        method = METHODS_BY_KEY[self.method]
        overrides = [*BASE_OVERRIDES, *method.overrides, f"data.shots={self.shots}", f"seed={self.seed}"]
        if self.lr is not None:
            overrides += [f"model.optimizer.lr={self.lr}", f"trainer.max_steps={max_steps(self.shots)}"]
        if self.protocol == BASE_TO_NEW:
            return [*overrides, "data.subsample=base_to_new"]
        return [*overrides, f"data.test_sets=[{','.join((*SHIFT_SETS, *CROSS_SETS))}]"]


def zero_shot_jobs() -> list[Job]:
    return [Job("zero_shot", protocol, 0, SELECTION_SEED, None) for protocol in (FEW_SHOT, BASE_TO_NEW)]


def selection_jobs(method: Method, lrs: Sequence[float] | None = None) -> list[Job]:
    """The grid of `method` (or `lrs`): 16-shot runs with seed 1, one a learning rate."""
    return [Job(method.key, FEW_SHOT, SELECTION_SHOTS, SELECTION_SEED, lr) for lr in (lrs or method.lrs)]


def remaining_jobs(method: str, lr: float, shots: Sequence[int], seeds: Sequence[int]) -> list[Job]:
    """Every run of `method` at its chosen `lr` but the selection run, longest first."""
    jobs = [Job(method, BASE_TO_NEW, BASE_TO_NEW_SHOTS, seed, lr) for seed in seeds]
    for count in sorted(shots, reverse=True):
        jobs += [
            Job(method, FEW_SHOT, count, seed, lr)
            for seed in seeds
            if (count, seed) != (SELECTION_SHOTS, SELECTION_SEED)
        ]
    return jobs


def train_config(overrides: Sequence[str]):
    """`configs/train.yaml` with `overrides`, as ``train.py`` hands it to the train task: the hydra node
    registered as the current `HydraConfig` (for ``${hydra:...}``), then removed."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from kr_vlm.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def validation_metrics(metrics_csv: Path) -> dict[str, float]:
    """``val_top1`` and ``val_loss`` (the mean over the validation sets) of the run's last validation,
    from the CSV log the run wrote."""
    with metrics_csv.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get(metric_names.VAL_TOP1)]
    if not rows:
        raise ValueError(f"{metrics_csv} has no {metric_names.VAL_TOP1}: the run did not validate.")
    last = rows[-1]
    suffix = f"/{metric_names.LOSS}"
    losses = [float(value) for key, value in last.items() if key.startswith("val/") and key.endswith(suffix)]
    return {"val_top1": float(last[metric_names.VAL_TOP1]), "val_loss": statistics.fmean(losses)}


def run_job(job: Job, runs_dir: str, extra_overrides: Sequence[str]) -> dict[str, Any]:
    """Run `job` with the real train task in this process; its record for the tables. A fit that
    diverged is recorded (``error``), not raised: the benchmark goes on without it."""
    from hydra.core.hydra_config import HydraConfig

    from kr_vlm.callbacks.divergence import TrainingDivergedError
    from kr_vlm.cli import train

    run_dir = Path(runs_dir) / job.folder
    record: dict[str, Any] = {**dataclasses.asdict(job), "folder": job.folder}
    cfg = train_config([*job.overrides(), *extra_overrides, f"paths.output_dir={run_dir}"])
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        metrics = train(cfg)
    except TrainingDivergedError as error:
        return {**record, "error": str(error), "wall_time_s": time.perf_counter() - start}
    finally:
        HydraConfig.instance().cfg = None
    record.update(
        test={name: values[metric_names.TOP1] for name, values in metrics["test"].items()},
        trainable_params=metrics["trainable_params"],
        steps=metrics["steps"],
        fit_time_s=metrics.get("fit_time_s"),
        wall_time_s=time.perf_counter() - start,
        cpu_time_s=time.process_time() - cpu_start,
    )
    if job.lr is not None:
        record.update(validation_metrics(run_dir / "csv" / "metrics.csv"))
    return record


def choose_lr(records: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The selection run with the highest validation top-1, ties to the lower validation loss; None when
    every run diverged."""
    finished = [record for record in records if "error" not in record]
    if not finished:
        return None
    return max(finished, key=lambda record: (record["val_top1"], -record["val_loss"]))


class InProcessExecutor(Executor):
    """Runs each submitted call at once in this process (``--workers 1``)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(error)
        return future


def _quiet_worker(log_path: str) -> None:
    """A worker's output (its runs' logs and tables) goes to its own file, not the benchmark's console."""
    handle = os.open(f"{log_path}.{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(handle, 1)
    os.dup2(handle, 2)


@dataclasses.dataclass(frozen=True)
class Settings:
    methods: tuple[str, ...] = tuple(method.key for method in METHODS)
    shots: tuple[int, ...] = SHOTS
    seeds: tuple[int, ...] = SEEDS
    workers: int = 2
    # The same grid for every method instead of each one's own (quick checks).
    lrs: tuple[float, ...] | None = None
    # Hydra overrides for every run, after the benchmark's own (paths, a smaller model for tests, ...).
    overrides: tuple[str, ...] = ()

    def check(self) -> None:
        unknown = [key for key in self.methods if key not in METHODS_BY_KEY]
        if unknown:
            raise ValueError(f"Unknown methods {unknown}; known: {', '.join(METHODS_BY_KEY)}.")
        if SELECTION_SHOTS not in self.shots or SELECTION_SEED not in self.seeds:
            raise ValueError(
                f"The learning rate is chosen on {SELECTION_SHOTS}-shot runs with seed {SELECTION_SEED}: "
                "keep them in --shots and --seeds."
            )
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}.")


def run_benchmark(settings: Settings, runs_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every run of the benchmark, in `settings.workers` processes; the results for the tables."""
    settings.check()
    runs_dir.mkdir(parents=True, exist_ok=True)
    if any(runs_dir.iterdir()):
        raise ValueError(f"{runs_dir} is not empty: give the benchmark a new runs folder.")
    methods = [METHODS_BY_KEY[key] for key in settings.methods]
    start, load_before, cpu_before = time.perf_counter(), os.getloadavg(), _cpu_time()
    if settings.workers == 1:
        executor: Executor = InProcessExecutor()
    else:
        executor = ProcessPoolExecutor(
            settings.workers,
            mp_context=get_context("spawn"),
            initializer=_quiet_worker,
            initargs=(str(runs_dir / "worker.log"),),
        )
    records: list[dict[str, Any]] = []
    selection: dict[str, dict[str, Any]] = {}
    pending: dict[Future, Job] = {}
    grids: dict[str, list[Job]] = {}

    def submit(jobs: Iterable[Job]) -> None:
        for job in jobs:
            pending[executor.submit(run_job, job, str(runs_dir), settings.overrides)] = job

    with executor:
        for method in methods:
            if method.trains:
                grids[method.key] = selection_jobs(method, settings.lrs)
        # The longest runs first: the selection grids, then zero-shot.
        submit(job for jobs in grids.values() for job in jobs)
        if any(not method.trains for method in methods):
            submit(zero_shot_jobs())
        total = len(pending) + sum(
            len(remaining_jobs(key, 0.0, settings.shots, settings.seeds)) for key in grids
        )
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                record = future.result()
                records.append(record)
                log(_progress_line(len(records), total, record, time.perf_counter() - start))
                grid = grids.get(job.method)
                if grid is None or job not in grid:
                    continue
                tried = [r for r in records if r["method"] == job.method and Job(**_job_fields(r)) in grid]
                if len(tried) < len(grid):
                    continue
                chosen = choose_lr(tried)
                selection[job.method] = {
                    "grid": [r["lr"] for r in sorted(tried, key=lambda r: r["lr"])],
                    "runs": {
                        f"{r['lr']:g}": {
                            key: r.get(key) for key in ("val_top1", "val_loss", "error") if key in r
                        }
                        for r in tried
                    },
                    "chosen": None if chosen is None else chosen["lr"],
                }
                if chosen is None:
                    log(f"{job.method}: every learning rate diverged; the method is left out.")
                    continue
                log(
                    f"{job.method}: lr {chosen['lr']:g} chosen (validation top-1 {100 * chosen['val_top1']:.1f} %)"
                )
                submit(remaining_jobs(job.method, chosen["lr"], settings.shots, settings.seeds))
    # Runs of the grid other than the chosen one are not results of the benchmark.
    chosen_lrs = {key: entry["chosen"] for key, entry in selection.items()}
    results = [
        record
        for record in records
        if record["lr"] is None or chosen_lrs.get(record["method"]) == record["lr"]
    ]
    return {
        "date": datetime.date.today().isoformat(),
        "settings": dataclasses.asdict(settings),
        "methods": [dataclasses.asdict(method) for method in methods],
        "selection": selection,
        "runs": results,
        "grid_runs": [record for record in records if record not in results],
        "timing": {
            "wall_time_s": time.perf_counter() - start,
            # This process and its finished workers, start-up included (the pool has been shut down).
            "cpu_time_s": _cpu_time() - cpu_before,
            "runs": len(records),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "machine": machine_description(settings.workers),
    }


def _cpu_time() -> float:
    """User and system CPU seconds of this process and of its children that have been waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _job_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    return {field.name: record[field.name] for field in dataclasses.fields(Job)}


def _progress_line(index: int, total: int, record: Mapping[str, Any], elapsed: float) -> str:
    what = f"{record['method']} {record['protocol']} {record['shots']} shots seed {record['seed']}"
    if record["lr"] is not None:
        what += f" lr {record['lr']:g}"
    if "error" in record:
        outcome = "diverged"
    else:
        tops = ", ".join(f"{name} {100 * top1:.1f}" for name, top1 in record["test"].items())
        outcome = (f"val {100 * record['val_top1']:.1f}; " if "val_top1" in record else "") + f"test {tops}"
    return f"[{index:>3}/{total}] {elapsed:6.0f} s  {what}: {outcome} ({record['wall_time_s']:.0f} s)"


def machine_description(workers: int) -> dict[str, Any]:
    import torch

    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        model = names[0] if names else model
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "workers": workers,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


# ----------------------------------------------------------------------------------------------- tables


def _cells(runs: Iterable[Mapping[str, Any]], value: Callable[[Mapping[str, Any]], float | None]):
    """{(method, shots): Cell of percentages over seeds} for the finished runs that have a value."""
    values: dict[tuple[str, int], list[float]] = defaultdict(list)
    for run in runs:
        if "error" not in run and (found := value(run)) is not None:
            values[run["method"], run["shots"]].append(100 * found)
    return {key: Cell(tuple(found)) for key, found in values.items()}


def _labels(results: Mapping[str, Any]) -> dict[str, str]:
    return {method["key"]: method["label"] for method in results["methods"]}


def _add(table: Table, name: str, label: str, shots: int, column: str, cell: Cell | None, mean=None) -> None:
    """`table`'s record of `cell` (or of a `mean` without seeds); nothing when there is neither."""
    if cell is not None or mean is not None:
        table.record(name, label, shots, column, cell.mean if mean is None else mean, cell)


def _text(cell: Cell | None) -> str:
    return "–" if cell is None else str(cell)


def _params(results: Mapping[str, Any]) -> dict[str, str]:
    counts: dict[str, set[int]] = defaultdict(set)
    for run in results["runs"]:
        if "trainable_params" in run:
            counts[run["method"]].add(run["trainable_params"])
    return {key: "/".join(f"{count:,}" for count in sorted(found)) for key, found in counts.items()}


def _few_shot_runs(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [run for run in results["runs"] if run["protocol"] == FEW_SHOT]


def setup_table(results: Mapping[str, Any]) -> Table:
    """Each method's linears, size, trainable parameters, learning-rate grid with the validation top-1 of
    every rate, and the chosen rate."""
    table = Table(
        "setup",
        "Methods: what they adapt, their size, and the learning rate chosen on the validation shots",
        [
            "method",
            "linears (both towers)",
            "size",
            "trainable params",
            "lr: validation top-1 % (16 shots, seed 1)",
            "chosen lr",
        ],
    )
    params = _params(results)
    for method in results["methods"]:
        entry = results["selection"].get(method["key"])
        if entry is None:
            grid, chosen = "–", "–"
        else:
            parts = []
            for lr in entry["grid"]:
                run = entry["runs"][f"{lr:g}"]
                shown = "diverged" if "error" in run else f"{100 * run['val_top1']:.1f}"
                parts.append(f"**{lr:g}: {shown}**" if lr == entry["chosen"] else f"{lr:g}: {shown}")
            grid = ", ".join(parts)
            chosen = "–" if entry["chosen"] is None else f"{entry['chosen']:g}"
            if entry["chosen"] is not None and entry["chosen"] in (entry["grid"][0], entry["grid"][-1]):
                chosen += " (grid edge)"
        table.rows.append(
            [method["label"], method["linears"], method["size"], params.get(method["key"], "0"), grid, chosen]
        )
    return table


def few_shot_table(results: Mapping[str, Any]) -> Table:
    shots = results["settings"]["shots"]
    table = Table(
        FEW_SHOT,
        "Few-shot: top-1 % on the digits test split (mean ± std over seeds)",
        ["method", "trainable params", *[f"{count} shot{'s' if count > 1 else ''}" for count in shots]],
    )
    cells = _cells(_few_shot_runs(results), lambda run: run["test"].get(SOURCE))
    params = _params(results)
    for key, label in _labels(results).items():
        if (key, 0) in cells:  # zero-shot trains nothing: its one evaluation stands under every count
            table.rows.append([label, "0", *[_text(cells[key, 0])] * len(shots)])
            _add(table, SOURCE, label, 0, SOURCE, cells[key, 0])
            continue
        row = [cells.get((key, count)) for count in shots]
        if all(cell is None for cell in row):
            continue
        table.rows.append([label, params.get(key, "0"), *map(_text, row)])
        for count, cell in zip(shots, row, strict=True):
            _add(table, SOURCE, label, count, SOURCE, cell)
    if any(key == "zero_shot" for key, _ in cells):
        table.notes.append("Zero-shot trains nothing: its one evaluation is shown under every shot count.")
    return table


def target_table(results: Mapping[str, Any], protocol: str, targets: Sequence[str], title: str) -> Table:
    """The source, each target set and the average over the targets: zero-shot, then every method at
    every shot count."""
    average = "target avg"
    table = Table(protocol, title, ["method", "shots", SOURCE, *targets, average])
    runs = _few_shot_runs(results)
    columns = {
        name: _cells(runs, lambda run, name=name: run["test"].get(name)) for name in (SOURCE, *targets)
    }
    labels = _labels(results)
    rows = [(key, 0) for key in labels if key == "zero_shot"]
    rows += [(key, count) for count in results["settings"]["shots"] for key in labels if key != "zero_shot"]
    for key, count in rows:
        row = {name: columns[name].get((key, count)) for name in (SOURCE, *targets)}
        if all(cell is None for cell in row.values()):
            continue
        found = [row[name] for name in targets]
        mean = None if any(cell is None for cell in found) else statistics.fmean(c.mean for c in found)
        table.rows.append(
            [
                labels[key],
                str(count),
                *[_text(row[name]) for name in (SOURCE, *targets)],
                "–" if mean is None else f"{mean:.1f}",
            ]
        )
        for name, cell in row.items():
            _add(table, protocol, labels[key], count, name, cell)
        if mean is not None:
            _add(table, protocol, labels[key], count, average, None, mean)
    return table


def base_to_new_table(results: Mapping[str, Any]) -> Table:
    table = Table(
        BASE_TO_NEW,
        f"Base-to-new: trained on digits 0-4 ({BASE_TO_NEW_SHOTS} shots), top-1 % on the base (0-4) and "
        "new (5-9) test digits, and their harmonic mean (HM of the means)",
        ["method", "seeds", "base", "new", "HM"],
    )
    runs = [run for run in results["runs"] if run["protocol"] == BASE_TO_NEW]
    base = _cells(runs, lambda run: run["test"].get(f"{SOURCE}_base"))
    new = _cells(runs, lambda run: run["test"].get(f"{SOURCE}_new"))
    for key, label in _labels(results).items():
        shots = 0 if key == "zero_shot" else BASE_TO_NEW_SHOTS
        if (key, shots) not in base or (key, shots) not in new:
            continue
        b, n = base[key, shots], new[key, shots]
        hm = harmonic_mean(b.mean, n.mean)
        table.rows.append([label, str(len(b.values)), str(b), str(n), f"{hm:.1f}"])
        _add(table, BASE_TO_NEW, label, shots, "base", b)
        _add(table, BASE_TO_NEW, label, shots, "new", n)
        _add(table, BASE_TO_NEW, label, shots, "hm", None, hm)
    return table


def benchmark_tables(results: Mapping[str, Any]) -> list[Table]:
    return [
        setup_table(results),
        few_shot_table(results),
        target_table(
            results,
            "distribution_shift",
            SHIFT_SETS,
            "Distribution shift: trained on clean digits, top-1 % on the shifted domains (mean ± std over "
            "seeds; the average is over the shifted domains only)",
        ),
        target_table(
            results,
            "cross_dataset",
            CROSS_SETS,
            "Cross-dataset transfer: trained on digits, top-1 % on glyphs (digits and letters, 36 classes, in "
            "the 5 fonts held out of the miniature's pretraining)",
        ),
        base_to_new_table(results),
    ]


def markdown(results: Mapping[str, Any], command: str) -> str:
    timing, machine = results["timing"], results["machine"]
    load = timing["load_average_before"]
    lines = [
        "# The mini benchmark",
        "",
        "The papers' evaluation in miniature, on the miniature CLIP that ships with kr_vlm (`model=mini`), offline "
        "(the protocol: `kr_vlm.benchmarks.mini`). Every run is `train.py experiment=mini_kr_fewshot` with the "
        "method's adapter and the chosen learning rate.",
        "",
        f"- command: `{command}`",
        f"- date: {results['date']}; machine: {machine['cpu']}, {machine['cores']} cores, {machine['workers']} "
        f"worker processes of one thread; torch {machine['torch']}",
        f"- wall time: {timing['wall_time_s'] / 60:.1f} min for {timing['runs']} runs; CPU time (all processes): "
        f"{timing['cpu_time_s'] / 60:.1f} min; load average (1, 5, 15 min) at the start "
        f"{load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}, at the end "
        + ", ".join(f"{value:.1f}" for value in timing["load_average_after"]),
        f"- shots {', '.join(map(str, results['settings']['shots']))}; seeds "
        f"{', '.join(map(str, results['settings']['seeds']))}; steps "
        + ", ".join(f"{max_steps(count)} at {count} shots" for count in results["settings"]["shots"]),
        "",
    ]
    lines += [table.markdown() for table in benchmark_tables(results)]
    lines += ["![mini benchmark](mini_benchmark.png)", ""]
    return "\n".join(lines)


def write_outputs(results: dict[str, Any], out_dir: Path, command: str) -> dict[str, Path]:
    """``mini_benchmark.{md,csv,json,png}`` in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"mini_benchmark.{kind}" for kind in ("md", "csv", "json", "png")}
    results = {**results, "command": command}
    write_json_atomic(paths["json"], results)
    write_text_atomic(paths["md"], markdown(results, command))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for table in benchmark_tables(results):
        writer.writerows(table.records)
    write_text_atomic(paths["csv"], text.getvalue())
    plot(results, paths["png"])
    return paths


def plot(results: Mapping[str, Any], path: Path) -> None:
    """Top-1 against shots on clean digits, on the shifted domains (average) and on glyphs; base / new / HM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = results["settings"]["shots"]
    runs = _few_shot_runs(results)
    panels = (
        ("clean digits (few-shot)", lambda run: run["test"].get(SOURCE)),
        (
            "shifted digits, average (distribution shift)",
            lambda run: (
                statistics.fmean(run["test"][name] for name in SHIFT_SETS)
                if all(name in run["test"] for name in SHIFT_SETS)
                else None
            ),
        ),
        ("glyphs in held-out fonts (cross-dataset)", lambda run: run["test"].get(CROSS_SETS[0])),
    )
    figure, axes = plt.subplots(2, 2, figsize=(12, 9))
    labels = _labels(results)
    for axis, (title, value) in zip(axes.flat, panels, strict=False):
        cells = _cells(runs, value)
        for key, label in labels.items():
            if key == "zero_shot":
                if (key, 0) in cells:
                    axis.axhline(cells[key, 0].mean, color="gray", linestyle="--", label=label)
                continue
            points = [(count, cells[key, count]) for count in shots if (key, count) in cells]
            if points:
                axis.errorbar(
                    [count for count, _ in points],
                    [cell.mean for _, cell in points],
                    yerr=[cell.std for _, cell in points],
                    marker="o",
                    capsize=3,
                    linewidth=2.5 if key == "kradapter" else 1.2,
                    label=label,
                )
        axis.set_xscale("log", base=2)
        axis.set_xticks(shots, [str(count) for count in shots])
        axis.set_xlabel("shots per class")
        axis.set_ylabel("top-1 %")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axis = axes.flat[3]
    b2n = base_to_new_table(results)
    names = [row[0] for row in b2n.rows]
    means = {(record["method"], record["column"]): float(record["mean"]) for record in b2n.records}
    width = 0.27
    for index, column in enumerate(("base", "new", "hm")):
        axis.bar(
            [position + (index - 1) * width for position in range(len(names))],
            [means.get((name, column), 0.0) for name in names],
            width,
            label={"hm": "HM"}.get(column, column),
        )
    axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    axis.set_ylabel("top-1 %")
    axis.set_title(f"base-to-new ({BASE_TO_NEW_SHOTS} shots on digits 0-4)")
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    handles, legend_labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(
        handles, legend_labels, loc="lower center", ncol=min(len(legend_labels), 5), fontsize=8, frameon=False
    )
    figure.suptitle(
        f"Mini benchmark: kr-vlm-mini, mean ± std over seeds {', '.join(map(str, results['settings']['seeds']))}"
    )
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
