"""The field's four results tables and the ID / OOD frontier from kr_vlm's run folders, and the protocol
summary of one run.

Every run writes ``metrics.json`` (`kr_vlm.cli`): the top-1 accuracy of each test set, and
``test_roles``, what each test set measures (set by the DataModule): ``source`` (the training
dataset, all classes), ``base`` / ``new`` (its two halves, base-to-new), ``shift`` (a shifted
version of the source, e.g. ImageNet-A, digits_rotated), ``cross`` (another dataset). From those:

- few-shot: datasets x shots, the mean ± std over seeds of the source accuracy, and the average
  over datasets (CoOp's and CLIP-LoRA's few-shot tables);
- base-to-new: base, new and their harmonic mean per dataset, and the average over datasets
  (CoCoOp's Table 1: the HM of the averaged base and new accuracies);
- distribution shift: the source, each shifted set and the average over the shifted sets only
  (CoCoOp's Table 3: the source is not averaged with the targets);
- cross-dataset: the source, each other dataset and the average over the targets (CoCoOp's Table 2);
- the ID / OOD frontier (``frontier``): every trained model at every update scale α it was tested at
  (``test_by_scale``), the ID against the OOD top-1 of each protocol, per method over α and the
  learning rate, and a table of each method's OOD top-1 at shares of its best ID gain over zero-shot
  (WiSE-FT's and CLAP's comparison). Its figure is ``frontier_figure`` (matplotlib, imported apart).

Runs are grouped by what was trained: the method, the training dataset, classes, shots and seed,
and the training recipe (`RECIPE_KEYS`: model and adapter config, optimizer, sampler, ...). An
evaluation (``eval.py``) of adapters whose training run is also found counts with that training
run, never as another seed: its ``metrics.json`` names the adapters it tested (``adapters_from``,
or ``adapters_dir`` / ``ckpt_path`` in its config), and the run folder above them is the training
run's. A test set that two runs of the same trained model measured is counted once, the training
run's first.

The modules: ``runs`` (reading and grouping runs), ``labels`` (naming runs by the settings in which
they differ), ``summary`` (one run's protocol summary), ``tables``, ``references`` (published rows of the
protocol tables), ``frontier``; ``atlas`` (the KRAdapter / RandLoRA papers' table on aTLAS's 22 datasets)
and ``published`` (open_clip's and aTLAS's published zero-shot accuracies, ``published_tables/``) are
imported by name. They read JSON only (no torch, no matplotlib), so ``scripts/aggregate_results.py``
starts quickly.
"""

from kr_vlm.results.frontier import (
    POINTS_FIELDS,
    Frontier,
    frontier_table,
    frontiers,
    ood_where_id_reaches,
    points_rows,
)
from kr_vlm.results.references import REFERENCE_FILE, Reference, load_references
from kr_vlm.results.runs import (
    EVALUATION_KEYS,
    RECIPE_KEYS,
    Measurements,
    Run,
    Trained,
    config_settings,
    load_runs,
    measure,
    read_run,
)
from kr_vlm.results.summary import PROTOCOLS, TARGET_PROTOCOLS, harmonic_mean, protocol_summary, summary_lines
from kr_vlm.results.tables import (
    CSV_FIELDS,
    Cell,
    Table,
    base_to_new_table,
    few_shot_table,
    protocol_tables,
    target_tables,
)

__all__ = [
    "CSV_FIELDS",
    "EVALUATION_KEYS",
    "POINTS_FIELDS",
    "PROTOCOLS",
    "RECIPE_KEYS",
    "REFERENCE_FILE",
    "TARGET_PROTOCOLS",
    "Cell",
    "Frontier",
    "Measurements",
    "Reference",
    "Run",
    "Table",
    "Trained",
    "base_to_new_table",
    "config_settings",
    "few_shot_table",
    "frontier_table",
    "frontiers",
    "harmonic_mean",
    "load_references",
    "load_runs",
    "measure",
    "ood_where_id_reaches",
    "points_rows",
    "protocol_summary",
    "protocol_tables",
    "read_run",
    "summary_lines",
    "target_tables",
]
