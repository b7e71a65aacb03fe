"""The names the metrics are logged and stored under, shared by the LightningModule and the command line.

``CLIPFineTuner`` logs ``<stage>/<task>/<metric>`` for every evaluation set (``test/digits/top1``) and
``<stage>/top1``, the mean top-1 over the sets; ``metrics.json`` holds ``{"test": {task: {metric: value}}}``.
"""

from __future__ import annotations

#: The file in a run folder that holds what the run measured and how it was configured.
METRICS_FILE = "metrics.json"

TOP1 = "top1"
TOP5 = "top5"
LOSS = "loss"
#: What every evaluation set reports.
EVAL_METRICS = (TOP1, TOP5, LOSS)

TRAIN, VAL, TEST = "train", "val", "test"
#: The mean validation top-1 over the validation sets: what checkpoints and hyperparameter searches watch.
VAL_TOP1 = f"{VAL}/{TOP1}"


def metric_key(stage: str, metric: str, task: str | None = None) -> str:
    """``<stage>/<task>/<metric>``, or ``<stage>/<metric>`` for a stage's mean or training metric."""
    return f"{stage}/{metric}" if task is None else f"{stage}/{task}/{metric}"
