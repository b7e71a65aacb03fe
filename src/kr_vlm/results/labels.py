"""Naming runs by the settings in which they differ: the rows of the protocol tables and frontiers
(``table_labels``: ``kradapter (lr=0.001)``) and the runs of the rank dashboard (``run_labels``:
``kradapter, 16 shots, lr=0.001``). A setting is a flat dotted key of a run's config (``model.optimizer.lr``,
see ``runs.config_settings``), shown by the shortest end of its key that no other differing key ends in."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kr_vlm.results.runs import RECIPE_KEYS, config_settings

# A method's options (and targets) are compared among the runs of that method only: LoRA's r is not a
# difference between a LoRA run and a KRAdapter run.
METHOD_OPTIONS_PREFIX = "model.adapter."
# The settings a run label names first (a run's own keys of metrics.json, then its recipe's).
RUN_LABEL_ORDER = ("method", "dataset", "shots", "seed")


def differing_keys(settings: Sequence[Mapping[str, Any]], missing_differs: bool = True) -> list[str]:
    """The keys whose values differ among ``settings``, in the order they first come. ``missing_differs``:
    an entry without the key counts as a value of its own (else only the entries that have it compare)."""
    keys = list(dict.fromkeys(key for entry in settings for key in entry))

    def values(key: str) -> set[str]:
        among = settings if missing_differs else [entry for entry in settings if key in entry]
        return {json.dumps(entry.get(key), default=str) for entry in among}

    return [key for key in keys if len(values(key)) > 1]


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key ends in (``model.optimizer.lr`` -> ``lr``)."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for length in range(1, len(parts) + 1):
            suffix = ".".join(parts[-length:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        names[key] = suffix
    return names


def setting_text(name: str, value: Any) -> str:
    """One setting in a label: ``lr=0.001``, ``16 shots``, ``seed 2``, a dataset or method by its name,
    a list (kept as JSON by ``config_settings``) as ``[a, b]``."""
    if name in ("method", "dataset"):
        return str(value)
    if name == "shots":
        return f"{value} shots"
    if name == "seed":
        return f"seed {value}"
    if isinstance(value, str) and value.startswith("["):
        value = ", ".join(map(str, json.loads(value))).join("[]")
    return f"{name}={value}"


def table_labels(rows: Iterable[tuple[str, int, tuple[tuple[str, Any], ...]]]) -> dict[Any, str]:
    """A label for each table row ``(method, shots, settings)``: the method, and in brackets the settings
    in which rows of the same method and shots differ (rows of other shots differ in the shots column)."""
    rows = list(rows)
    labels = {}
    for method, shots in {row[:2] for row in rows}:
        same = [row for row in rows if row[:2] == (method, shots)]
        settings = [dict(row[2]) for row in same]
        differing = sorted(differing_keys(settings))
        names = short_names(differing)
        for row, values in zip(same, settings, strict=True):
            parts = [setting_text(names[key], values.get(key)) for key in differing]
            labels[row] = f"{method} ({', '.join(parts)})" if parts else method
    return labels


def run_settings(method: str, metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a run trained: its method, dataset, shots and seed (from its ``metrics.json``, if it has one),
    and its recipe (``RECIPE_KEYS``: model and adapter config, optimizer, sampler, ...) as dotted keys."""
    settings: dict[str, Any] = {"method": method}
    if metrics:
        settings.update(
            {key: metrics[key] for key in RUN_LABEL_ORDER[1:] if metrics.get(key) is not None}
        )
        recipe = config_settings(metrics.get("config") or {}, RECIPE_KEYS)
        settings.update({key: value for key, value in recipe.items() if key != "model.adapter.method"})
    return settings


def differing_run_settings(settings: Sequence[Mapping[str, Any]]) -> list[str]:
    """The settings (of ``run_settings``) in which some runs differ, ``RUN_LABEL_ORDER`` first. A method's
    options count among the runs of that method only; a setting some runs lack (not tested, no config) is
    no difference."""
    by_method: dict[Any, list[Mapping[str, Any]]] = {}
    for entry in settings:
        by_method.setdefault(entry["method"], []).append(entry)
    among_all = differing_keys(settings, missing_differs=False)
    among_methods = {key for group in by_method.values() for key in differing_keys(group, missing_differs=False)}
    keys = list(dict.fromkeys(key for entry in settings for key in entry))
    differing = [
        key
        for key in keys
        if (key in among_methods if key.startswith(METHOD_OPTIONS_PREFIX) else key in among_all)
    ]
    return [key for key in RUN_LABEL_ORDER if key in differing] + [
        key for key in differing if key not in RUN_LABEL_ORDER
    ]


def run_labels(settings: Sequence[Mapping[str, Any]]) -> list[str]:
    """A label for each run (``run_settings``): the settings in which the runs differ, led by the method
    (the method alone when they differ in nothing)."""
    differing = differing_run_settings(settings)
    names = short_names(differing)
    labels = []
    for entry in settings:
        parts = [setting_text(names[key], entry[key]) for key in differing if key in entry]
        label = ", ".join(parts) if parts else str(entry["method"])
        if "method" not in differing and parts:
            label = f"{entry['method']}, {label}"
        labels.append(label)
    return labels
