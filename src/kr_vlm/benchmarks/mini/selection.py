"""The learning-rate choice: each rate's mean validation top-1 over the seeds, the best rate (ties to the
smaller), whether it lies at an edge of the rates tried, and the next rate out when it does."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Means closer than this are a tie (they are means of a few hundred 0/1 outcomes).
TIE_TOLERANCE = 1e-9
LOWER, UPPER = "lower", "upper"


@dataclasses.dataclass(frozen=True)
class RateScore:
    """One rate: the validation top-1 of each seed (None: diverged or not run), and their mean, None
    unless every seed finished (a rate that diverged once is never chosen)."""

    lr: float
    by_seed: dict[int, float | None]

    @property
    def mean(self) -> float | None:
        values = list(self.by_seed.values())
        if not values or any(value is None for value in values):
            return None
        return statistics.fmean(values)

    @property
    def std(self) -> float | None:
        values = list(self.by_seed.values())
        if self.mean is None or len(values) < 2:
            return None
        return statistics.stdev(values)

    @property
    def diverged(self) -> int:
        return sum(value is None for value in self.by_seed.values())


@dataclasses.dataclass(frozen=True)
class RateChoice:
    """The rates tried (ascending), the chosen one (None if none finished on every seed) and the edge of
    the tried rates it lies at (None: inside)."""

    scores: tuple[RateScore, ...]
    chosen: float | None
    edge: str | None

    @property
    def rates(self) -> list[float]:
        return [score.lr for score in self.scores]

    def to_json(self) -> dict[str, Any]:
        return {
            "rates": self.rates,
            "val_top1": {
                f"{score.lr:g}": {str(seed): value for seed, value in score.by_seed.items()}
                for score in self.scores
            },
            "mean_val_top1": {f"{score.lr:g}": score.mean for score in self.scores},
            "chosen": self.chosen,
            "edge": self.edge,
        }


def choose_rate(records: Iterable[Mapping[str, Any]], seeds: Sequence[int]) -> RateChoice:
    """The rate whose runs (``lr``, ``seed``, ``val_top1``; ``error`` when diverged) have the highest mean
    validation top-1 over `seeds`, ties to the smaller rate; a rate missing a seed or with a diverged seed
    is not eligible. The edge is the side of the tried rates (diverged ones included) the choice is on."""
    by_rate: dict[float, dict[int, float | None]] = {}
    for record in records:
        if record["seed"] in seeds:
            value = None if "error" in record else record["val_top1"]
            by_rate.setdefault(record["lr"], {})[record["seed"]] = value
    scores = tuple(RateScore(lr, {seed: by_rate[lr].get(seed) for seed in seeds}) for lr in sorted(by_rate))
    eligible = [score for score in scores if score.mean is not None]
    if not eligible:
        return RateChoice(scores, None, None)
    best = max(score.mean for score in eligible)
    chosen = min(score.lr for score in eligible if score.mean >= best - TIE_TOLERANCE)
    edge = LOWER if chosen == scores[0].lr else UPPER if chosen == scores[-1].lr else None
    return RateChoice(scores, chosen, edge)


def next_rate_out(choice: RateChoice, ratio: float) -> float | None:
    """The rate one step (x `ratio`) beyond the edge the choice is at; None when it is inside or there is
    no choice. Rounded to 6 significant digits, as the grids are."""
    if choice.chosen is None or choice.edge is None:
        return None
    rate = choice.rates[0] / ratio if choice.edge == LOWER else choice.rates[-1] * ratio
    return float(f"{rate:.6g}")
