"""Reading run folders: each ``metrics.json`` as a ``Run``, what was trained to get it (``Trained``: the
method, dataset, classes, shots, seed and recipe), and every run's top-1 per test set keyed by the trained
model (``measure``), an evaluation counted with its training run."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kr_vlm import metric_names

log = logging.getLogger(__name__)

# `model` stands for every entry below it. Paths, loggers, callbacks and test settings are left out.
RECIPE_KEYS = (
    "model",
    "data.sampler",
    "data.fraction",
    "data.val_shots",
    "data.train_templates",
    "data.batch_size",
    "data.min_iterations_per_epoch",
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.accumulate_grad_batches",
    "trainer.gradient_clip_val",
)
# Entries of `model` that say where weights come from, not what they are.
_NOT_RECIPE = ("cache_dir", "allow_download")
# How a run was evaluated: part of a table's row (zero-shot CLIP with one template or seven is two rows).
EVALUATION_KEYS = ("data.eval_templates", "data.classnames")
# Settings at these values are as good as absent: runs from before the setting existed, and data configs
# without it (digits_ood), group with the runs that have it at its default.
_DEFAULT_SETTINGS = {
    "data.classnames": "default",
    "data.min_iterations_per_epoch": 0,
    "trainer.accumulate_grad_batches": 1,
}


@dataclass(frozen=True)
class Run:
    """One ``metrics.json`` and what was trained to get it."""

    path: Path
    metrics: dict[str, Any]

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def config(self) -> dict[str, Any]:
        return self.metrics.get("config") or {}

    @property
    def adapters_source(self) -> str | None:
        """The adapters an evaluation tested (a folder or a checkpoint); None for a training run."""
        source = self.metrics.get("adapters_from")
        if source is None and "adapters_dir" in self.config:  # eval.yaml has the key, train.yaml not
            source = self.config.get("adapters_dir") or self.config.get("ckpt_path")
        return None if source in (None, "zero-shot") else str(source)

    @property
    def is_evaluation(self) -> bool:
        return "adapters_from" in self.metrics or "adapters_dir" in self.config

    def tests_by_scale(self) -> dict[float, dict[str, dict[str, float]]]:
        """The metrics per test set at each update scale α the run tested, ascending (``test_by_scale``;
        else its ``test``, at α = 1). A training run's zero-shot baseline (``zero_shot``) is its model at
        α = 0: every adapter starts at a zero update."""
        by_scale = {float(key): entry["test"] for key, entry in (self.metrics.get("test_by_scale") or {}).items()}
        by_scale = by_scale or {1.0: self.metrics["test"]}
        if self.metrics.get("zero_shot") and 0.0 not in by_scale:
            by_scale[0.0] = self.metrics["zero_shot"]
        return dict(sorted(by_scale.items()))

    def test_roles(self) -> dict[str, str]:
        """Each test set's role; for a metrics.json without ``test_roles`` (older runs), from the names:
        the dataset itself, ``<dataset>_base`` / ``_new``, ``<dataset>_<shift>``, and any other as cross."""
        if "test_roles" in self.metrics:
            return dict(self.metrics["test_roles"])
        dataset = self.metrics.get("dataset")
        roles = {}
        for name in self.metrics.get("test", {}):
            if name == dataset:
                roles[name] = "source"
            elif name in (f"{dataset}_base", f"{dataset}_new"):
                roles[name] = name.rpartition("_")[2]
            else:
                roles[name] = "shift" if name.startswith(f"{dataset}_") else "cross"
        return roles


def read_run(path: Path) -> Run | None:
    """The `Run` of one metrics.json; None, with a warning, for a file that is not a kr_vlm run's
    results (not valid JSON, e.g. still being written, or without `test` results)."""
    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        log.warning("Skipping %s: not readable as JSON (%s).", path, error)
        return None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("test"), dict):
        log.warning("Skipping %s: it has no `test` results.", path)
        return None
    return Run(Path(path), metrics)


def load_runs(folder: Path) -> list[Run]:
    """Every run below ``folder`` (each ``metrics.json``, in path order)."""
    return [run for path in sorted(Path(folder).rglob(metric_names.METRICS_FILE)) if (run := read_run(path)) is not None]


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        items: dict[str, Any] = {}
        for key, item in value.items():
            items.update(_flatten(item, f"{prefix}.{key}"))
        return items
    return {prefix: json.dumps(value) if isinstance(value, list) else value}


def _select(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def config_settings(config: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The entries of a run's config under ``keys`` (dotted; a key stands for every entry below it), as
    flat dotted keys; unset entries and where weights come from (``cache_dir``, ...) left out."""
    settings: dict[str, Any] = {}
    for key in keys:
        settings.update(_flatten(_select(config, key), key))
    return {
        key: value
        for key, value in settings.items()
        if value is not None
        and key.rpartition(".")[2] not in _NOT_RECIPE
        and _DEFAULT_SETTINGS.get(key) != value
    }


@dataclass(frozen=True)
class Trained:
    """What a run's model was trained as: the row of a table it belongs to, and the seed."""

    method: str
    dataset: str
    classes: str  # all, base or new
    shots: int
    seed: Any
    settings: tuple[tuple[str, Any], ...]  # recipe and evaluation settings, sorted

    @property
    def row(self) -> tuple[str, int, tuple[tuple[str, Any], ...]]:
        return (self.method, self.shots, self.settings)


def _trained(training: Run, evaluation: Run) -> Trained:
    """The `Trained` of `evaluation`'s results, whose model `training` trained (the same run for a
    training run)."""
    metrics, config = training.metrics, training.config
    subsample = _select(config, "data.subsample") or "all"
    settings = config_settings(config, RECIPE_KEYS) | config_settings(evaluation.config, EVALUATION_KEYS)
    return Trained(
        method=str(metrics.get("method") or "none"),
        dataset=str(metrics.get("dataset")),
        classes="base" if subsample == "base_to_new" else subsample,
        shots=int(metrics.get("shots") or 0),
        seed=metrics.get("seed"),
        settings=tuple(sorted(settings.items())),
    )


def _training_run(run: Run, by_folder: Mapping[Path, Run]) -> Run | None:
    """The training run of an evaluation's adapters: the run folder that holds them (``<run>/adapters``
    or ``<run>/checkpoints/<name>.ckpt``), among the runs read or else on disk."""
    source = Path(run.adapters_source).expanduser().absolute()
    for folder in source.parents[:2]:
        if folder in by_folder:
            return by_folder[folder]
        if (folder / metric_names.METRICS_FILE).is_file():
            return read_run(folder / metric_names.METRICS_FILE)
    return None


@dataclass
class Measurements:
    """Top-1 accuracies (percent) of trained models: `values[trained][test set] = (role, top1)`."""

    metric: str = metric_names.TOP1
    values: dict[Trained, dict[str, tuple[str, float]]] = field(default_factory=dict)
    duplicates: int = 0

    @property
    def metric_label(self) -> str:
        """``top-1`` for ``top1``: how the tables' titles name the metric."""
        return self.metric.replace("top", "top-")

    def add(self, trained: Trained, test_set: str, role: str, top1: float) -> None:
        sets = self.values.setdefault(trained, {})
        if test_set in sets:  # the same model measured again (a re-evaluation): counted once
            self.duplicates += 1
            return
        sets[test_set] = (role, top1)


def trained_models(runs: Sequence[Run]) -> Iterator[tuple[Run, Run, Trained, dict[str, str]]]:
    """Every run (training runs first) with the run that trained its model (itself for a training run),
    what that model is (``Trained``) and the role of each test set the run measured: an evaluation on
    another dataset than the training one makes every set it tested a cross-dataset target."""
    by_folder = {run.folder.absolute(): run for run in runs if not run.is_evaluation}
    for run in sorted(runs, key=lambda run: run.is_evaluation):
        training = run
        if run.adapters_source is not None:
            training = _training_run(run, by_folder) or run
            if training is run:
                log.warning(
                    "%s: the training run of %s was not found; the evaluation counts as a model of its own.",
                    run.path,
                    run.adapters_source,
                )
        roles = run.test_roles()
        other_dataset = run.metrics.get("dataset") != training.metrics.get("dataset")
        roles = {name: "cross" if other_dataset else roles.get(name, "cross") for name in run.metrics["test"]}
        yield run, training, _trained(training, run), roles


def measure(runs: Sequence[Run], metric: str = metric_names.TOP1) -> Measurements:
    """Every run's `metric` per test set, keyed by the model that was trained (training runs first)."""
    measurements = Measurements(metric)
    for run, _, trained, roles in trained_models(runs):
        for test_set, values in run.metrics["test"].items():
            if metric not in values:
                raise KeyError(f"{run.path}: test set {test_set!r} has no {metric!r} metric")
            if values[metric] is None:  # a non-finite result, written as null
                log.warning("%s: %s has no finite %s; left out.", run.path, test_set, metric)
                continue
            measurements.add(trained, test_set, roles[test_set], 100.0 * values[metric])
    return measurements
