"""Where a benchmark's numbers come from: the command, the date, the machine and how loaded it was, for the
pages the benchmarks write under ``docs/``. On a shared machine the load average says how much to trust a
time; ratios measured side by side move less than the times themselves."""

from __future__ import annotations

import datetime
import os
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kr_vlm.benchmarks.mini import machine_description


@dataclass
class Provenance:
    """Started when a benchmark starts (``Provenance.start``); ``record()`` when it ends."""

    command: str
    started: float = field(default_factory=time.perf_counter)
    load_before: tuple[float, float, float] = field(default_factory=os.getloadavg)

    @classmethod
    def start(cls, script: str, argv: Sequence[str]) -> Provenance:
        """For ``python <script> <argv>``, run from the repository root."""
        return cls(shlex.join(["python", script, *argv]))

    def record(self) -> dict[str, Any]:
        """The command, today's date, the machine, the wall time so far and the load averages."""
        return {
            "command": self.command,
            "date": datetime.date.today().isoformat(),
            "machine": machine_description(workers=1),
            "wall_time_s": time.perf_counter() - self.started,
            "load_average_before": list(self.load_before),
            "load_average_after": list(os.getloadavg()),
        }


def markdown_lines(record: dict[str, Any], device: str) -> list[str]:
    """A ``record()`` as the bullet list at the top of a docs page; ``device`` as the benchmark names it."""
    machine = record["machine"]

    def loads(values: Sequence[float]) -> str:
        return ", ".join(f"{value:.1f}" for value in values)

    return [
        f"- command: `{record['command']}`",
        f"- date: {record['date']}; machine: {machine['cpu']}, {machine['cores']} cores, {device}; "
        f"torch {machine['torch']}",
        f"- wall time {record['wall_time_s'] / 60:.1f} min; load average (1, 5, 15 min) at the start "
        f"{loads(record['load_average_before'])}, at the end {loads(record['load_average_after'])}",
    ]
