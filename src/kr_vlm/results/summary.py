"""What one run's ``metrics.json`` says about the protocols: ``protocol_summary`` (base/new/HM, source
and target averages, from each test set's role) and its console lines."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from kr_vlm import metric_names

PROTOCOLS = ("few_shot", "base_to_new", "distribution_shift", "cross_dataset")
# The roles of `protocol_summary`'s target sets, and the metrics.json key of each one's summary.
TARGET_PROTOCOLS = {"shift": "distribution_shift", "cross": "cross_dataset"}


def harmonic_mean(base: float, new: float) -> float:
    """CoCoOp's H: 2·b·n / (b + n) (0 when both are 0)."""
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def protocol_summary(test: Mapping[str, Mapping[str, float]], roles: Mapping[str, str]) -> dict[str, Any]:
    """What ``metrics.json`` records about the protocols, from top-1 per test set and each set's role.

    Always ``test_roles``; with a base and a new test set ``base_to_new: {base, new, hm}``; with
    shifted sets ``distribution_shift`` and with other datasets ``cross_dataset``, each
    ``{source, targets: {set: top1}, target_average}`` (the source is not in the average).
    """
    top1 = {name: values.get(metric_names.TOP1) for name, values in test.items()}
    by_role: dict[str, list[str]] = defaultdict(list)
    for name, role in roles.items():
        if top1.get(name) is not None:
            by_role[role].append(name)
    summary: dict[str, Any] = {"test_roles": dict(roles)}
    if by_role["base"] and by_role["new"]:
        base, new = top1[by_role["base"][0]], top1[by_role["new"][0]]
        summary["base_to_new"] = {"base": base, "new": new, "hm": harmonic_mean(base, new)}
    source = top1[by_role["source"][0]] if by_role["source"] else None
    for role, key in TARGET_PROTOCOLS.items():
        targets = {name: top1[name] for name in by_role[role]}
        if targets:
            average = statistics.fmean(targets.values())
            summary[key] = {"source": source, "targets": targets, "target_average": average}
    return summary


def summary_lines(metrics: Mapping[str, Any]) -> list[str]:
    """One line a protocol of ``protocol_summary`` for the console, in percent."""
    lines = []
    if "base_to_new" in metrics:
        b2n = metrics["base_to_new"]
        lines.append(
            f"base-to-new: base {_percent(b2n['base'])}, new {_percent(b2n['new'])}, HM {_percent(b2n['hm'])}"
        )
    for key in TARGET_PROTOCOLS.values():
        if key in metrics:
            part = metrics[key]
            lines.append(
                f"{key.replace('_', ' ')}: source {_percent(part['source'])}, "
                f"target average {_percent(part['target_average'])} over {len(part['targets'])} sets"
            )
    return lines


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"
