"""Which runs the benchmark makes, and in what order: `BenchmarkPlan` hands out the first jobs, and for each
finished run the jobs it makes necessary (the next rate out of a grid whose pick is at an edge, then the
other shot counts at the chosen rate). It knows nothing of processes or training."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kr_vlm.benchmarks.mini.protocol import (
    AUTHORS,
    CLIP_LORA,
    FEW_SHOT,
    GRID_RATIO,
    METHODS_BY_KEY,
    SELECTION_SHOTS,
    Job,
    Settings,
    rate_jobs,
    zero_shot_jobs,
)
from kr_vlm.benchmarks.mini.selection import RateChoice, choose_rate, next_rate_out


class BenchmarkPlan:
    """The runs of one benchmark. `first_jobs()` once, then `finished(record)` for every finished run, whose
    jobs go first in the queue (a widening holds up the rate choice, and the runs of the chosen rate
    wait for it)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.records: list[dict[str, Any]] = []
        # Per trained method (CLIP-LoRA's recipe): the rates submitted for the choice, the widenings so far,
        # the latest choice, and whether it is final.
        self.rates: dict[str, list[float]] = {}
        self.widenings: dict[str, int] = {}
        self.choices: dict[str, RateChoice] = {}
        self.final: set[str] = set()

    def first_jobs(self) -> list[Job]:
        """Every rate of every grid (the choice needs the few-shot runs first), then the other shot counts
        at the fixed rate, the authors' recipe and zero-shot."""
        settings, methods = self.settings, self.settings.trained_methods
        grid: list[Job] = []
        others: list[Job] = []
        if CLIP_LORA in settings.recipes:
            for method in methods:
                self.rates[method.key] = list(settings.grid(method))
                self.widenings[method.key] = 0
                for lr in self.rates[method.key]:
                    grid += rate_jobs(CLIP_LORA, method.key, lr, settings)
                for shots in self._other_shots():
                    others += rate_jobs(CLIP_LORA, method.key, method.fixed_lr, settings, shots)
        if AUTHORS in settings.recipes:
            for method in methods:
                for shots in settings.shots:
                    others += rate_jobs(AUTHORS, method.key, method.authors_lr, settings, shots)
        grid.sort(key=lambda job: job.protocol != FEW_SHOT)
        return [*grid, *others, *zero_shot_jobs(settings)]

    def _other_shots(self) -> list[int]:
        return [shots for shots in self.settings.shots if shots != SELECTION_SHOTS]

    def _is_selection_run(self, record: Mapping[str, Any]) -> bool:
        return (
            record["recipe"] == CLIP_LORA
            and record["protocol"] == FEW_SHOT
            and record["shots"] == SELECTION_SHOTS
            and record["method"] in self.rates
        )

    def finished(self, record: dict[str, Any]) -> list[Job]:
        """Record a finished run; the jobs it makes necessary."""
        self.records.append(record)
        if not self._is_selection_run(record):
            return []
        method = record["method"]
        runs = [run for run in self.records if self._is_selection_run(run) and run["method"] == method]
        if len(runs) < len(self.rates[method]) * len(self.settings.seeds):
            return []
        choice = choose_rate(runs, self.settings.seeds)
        self.choices[method] = choice
        widen = next_rate_out(choice, GRID_RATIO)
        if widen is not None and self.widenings[method] < self.settings.max_widening:
            self.widenings[method] += 1
            self.rates[method].append(widen)
            return rate_jobs(CLIP_LORA, method, widen, self.settings)
        self.final.add(method)
        if choice.chosen is None or choice.chosen == METHODS_BY_KEY[method].fixed_lr:
            return []  # the fixed rate's other shot counts are queued already
        return [
            job
            for shots in self._other_shots()
            for job in rate_jobs(CLIP_LORA, method, choice.chosen, self.settings, shots)
        ]

    def selection(self) -> dict[str, dict[str, Any]]:
        """Each method's choice, its widenings, and whether it is still at an edge with the limit reached."""
        return {
            method: {
                **choice.to_json(),
                "grid": list(self.settings.grid(METHODS_BY_KEY[method])),
                "widenings": self.widenings[method],
                "limit_reached": choice.edge is not None
                and self.widenings[method] >= self.settings.max_widening,
            }
            for method, choice in self.choices.items()
        }
