"""Running the benchmark: each job is the real train task (``kr_vlm.cli.train``) on a config composed from
``configs/`` as ``train.py`` composes it, in worker processes of a ``concurrent.futures`` executor (each
imports kr_vlm once, then runs many configs; one CPU thread a run, as the recipes set). `BenchmarkPlan`
says what to run; a job it adds goes first, and no more jobs are handed to the executor than it has
workers, so that a widening or a chosen rate's runs never wait behind the whole queue."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from kr_vlm import metric_names
from kr_vlm.benchmarks.machine import cpu_seconds, machine_description
from kr_vlm.benchmarks.mini.plan import BenchmarkPlan
from kr_vlm.benchmarks.mini.protocol import CLIP_LORA, Job, Settings, job_overrides
from kr_vlm.benchmarks.mini.selection import RateChoice
from kr_vlm.errors import ConfigError


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


def run_job(job: Job, runs_dir: str, settings: Settings) -> dict[str, Any]:
    """Run `job` with the real train task in this process; its record. A fit that diverged is recorded
    (``error``), not raised: the benchmark goes on without it."""
    from hydra.core.hydra_config import HydraConfig

    from kr_vlm.callbacks.divergence import TrainingDivergedError
    from kr_vlm.cli import train

    run_dir = Path(runs_dir) / job.folder
    record: dict[str, Any] = {**dataclasses.asdict(job), "folder": job.folder}
    cfg = train_config([*job_overrides(job, settings), *settings.overrides, f"paths.output_dir={run_dir}"])
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
        wall_time_s=time.perf_counter() - start,
        cpu_time_s=time.process_time() - cpu_start,
    )
    if job.lr is not None and job.recipe == CLIP_LORA:  # the rate choice reads them
        record.update(validation_metrics(run_dir / "csv" / "metrics.csv"))
    return record


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


def make_executor(workers: int, log_path: Path) -> Executor:
    """`workers` spawned processes (a fresh interpreter each: no state forked from this one), or this
    process itself for one."""
    if workers == 1:
        return InProcessExecutor()
    return ProcessPoolExecutor(
        workers, mp_context=get_context("spawn"), initializer=_quiet_worker, initargs=(str(log_path),)
    )


def progress_line(index: int, record: Mapping[str, Any], elapsed: float) -> str:
    what = f"{record['recipe']} {record['method']} {record['protocol']} {record['shots']} shots seed {record['seed']}"
    if record["lr"] is not None:
        what += f" lr {record['lr']:g}"
    if "error" in record:
        outcome = "diverged"
    else:
        tops = ", ".join(f"{name} {100 * top1:.1f}" for name, top1 in record["test"].items())
        outcome = (f"val {100 * record['val_top1']:.1f}; " if "val_top1" in record else "") + f"test {tops}"
    return f"[{index:>3}] {elapsed:6.0f} s  {what}: {outcome} ({record['wall_time_s']:.0f} s)"


def run_benchmark(settings: Settings, runs_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every run of the benchmark in `settings.workers` processes; the results for the report."""
    settings.check()
    runs_dir.mkdir(parents=True, exist_ok=True)
    if any(runs_dir.iterdir()):
        raise ConfigError(f"--runs-dir {runs_dir} is not empty: give the benchmark a new runs folder.")
    plan = BenchmarkPlan(settings)
    queue = deque(plan.first_jobs())
    start, cpu_before, load_before = time.perf_counter(), cpu_seconds(), os.getloadavg()
    loads: list[float] = []
    running: dict[Future, Job] = {}
    announced: set[str] = set()
    with make_executor(settings.workers, runs_dir / "worker.log") as executor:
        while queue or running:
            while queue and len(running) < settings.workers:
                job = queue.popleft()
                running[executor.submit(run_job, job, str(runs_dir), settings)] = job
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                del running[future]
                record = future.result()
                loads.append(os.getloadavg()[0])
                log(progress_line(len(plan.records) + 1, record, time.perf_counter() - start))
                added = plan.finished(record)
                for method in sorted(plan.final - announced):
                    announced.add(method)
                    log(_choice_line(method, plan.choices[method]))
                queue.extendleft(reversed(added))
    return {
        "date": datetime.date.today().isoformat(),
        "settings": dataclasses.asdict(settings),
        "selection": plan.selection(),
        "runs": plan.records,
        "timing": {
            "wall_time_s": time.perf_counter() - start,
            # This process and its finished workers, start-up included (the pool has been shut down).
            "cpu_time_s": cpu_seconds() - cpu_before,
            "runs": len(plan.records),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "load_1min_during": [min(loads, default=0.0), max(loads, default=0.0)],
        },
        "machine": machine_description(settings.workers),
    }


def _choice_line(method: str, choice: RateChoice) -> str:
    if choice.chosen is None:
        return f"{method}: every learning rate diverged on some seed; no rate chosen."
    where = "inside the rates tried" if choice.edge is None else f"at the {choice.edge} edge (widening limit)"
    return f"{method}: lr {choice.chosen:g} chosen, {where}; rates tried {', '.join(f'{r:g}' for r in choice.rates)}"
