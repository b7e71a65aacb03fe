"""The papers' evaluation in miniature: every method on the shipped miniature CLIP, offline, in one command
(``scripts/mini_benchmark.py``), compared on a learning rate that validation can tell apart, at a fixed
rate, under the KRAdapter authors' recipe, and along the ID / OOD frontier.

Every run is the real train task (``kr_vlm.cli.train``) on a config composed from ``configs/`` as
``python train.py experiment=<recipe> adapter=<method> ...`` would compose it, in worker processes. Each
writes its usual run folder (``metrics.json`` with ``test_by_scale``, ``csv/metrics.csv``, ``adapters/``)
under the runs folder; the tables and frontiers are ``kr_vlm.results``' own, read from those folders.

The protocol (the numbers: ``protocol``):

- methods (`BENCHMARK_METHODS`): zero-shot, KRAdapter, LoRA, DoRA, VeRA, LoKr, LoHa, RandLoRA and full
  fine-tuning on the same six linears (q k v o fc1 fc2) of every block of both towers, and LoRA as
  CLIP-LoRA places it (q k v, r=2). Each low-rank method's size is the one whose trainable count is
  closest to KRAdapter's; VeRA cannot reach it (two vectors a layer) and keeps peft's r=256; full
  fine-tuning trains every weight of the six linears. Scalings are each method's usual ones. The default
  run leaves DoRA, LoKr and LoHa out for time (`DEFAULT_METHODS`; ``--methods`` adds them).
- data: 16 shots of the digits a class, seeds 1, 2, 3; tested in the same run on the clean digits (ID),
  on the four shifted digits domains (distribution shift) and on glyphs in fonts held out of the
  miniature's pretraining (cross-dataset); base-to-new trains on digits 0-4 and tests on 0-4 and 5-9.
  Validation: 16 digits a class (``data.val_shots=16``) from the digits' val split, disjoint from the
  shots and the test split.
- every trained model is tested at each update scale α of `ALPHAS` (``adapter_scales``); α = 0 is the
  base model, which the recipe's zero-shot run measures once for all.
- CLIP-LoRA's recipe in miniature (``mini_kr_fewshot``, half its 200 steps): every method at every
  rate of its grid (`BenchmarkMethod.grid`: its fixed rate x 2^k), few-shot and base-to-new, 3 seeds.
  Two modes read these runs:
  - chosen rate (`selection`): the rate with the highest validation top-1 averaged over the seeds, ties
    to the smaller; a rate that diverged on any seed is never chosen. A pick at an edge of the rates tried
    runs the next rate out (x2) and chooses again, at most `MAX_WIDENING` times; the report says where
    each pick ended. Validation never sees a test image; base-to-new runs at the rate chosen on the
    few-shot runs (whose validation has all ten classes).
  - fixed rate: one rate for every adapter, as CLIP-LoRA (2e-4) and the KRAdapter authors (1e-3) give
    one: the miniature recipe's own 5e-3, set before any test number (CLIP-LoRA's 2e-4 scaled to a 40x
    shorter schedule, ``configs/experiment/mini_kr_fewshot.yaml``); full fine-tuning, which moves the
    pretrained weights themselves, gets WiSE-FT's 3e-5 scaled the same way (7.5e-4). The fixed rate is
    on every grid, so this mode costs no run of its own.
- the authors' recipe (``mini_kr_randlora``: caption loss on both towers, AdamW wd 0.1, batch 128,
  10 epochs of repeated shots, clipping, crops and flips, their q k v fc1 fc2), at their fixed rates: 1e-3,
  VeRA 1e-2, full fine-tuning 1e-3 (their code's default), the cosine ending at a hundredth of it;
  few-shot and base-to-new, 3 seeds, and its own zero-shot run (their caption "An image of {}").

Left out of every run, because they observe and never change training: the rank monitor, checkpoints,
the progress bar and the parameter table. The divergence stop stays.
"""

from kr_vlm.benchmarks.mini.plan import BenchmarkPlan
from kr_vlm.benchmarks.mini.protocol import (
    ALPHAS,
    AUTHORS,
    BASE_OVERRIDES,
    BASE_TO_NEW,
    BENCHMARK_METHODS,
    CLIP_LORA,
    CROSS_SETS,
    DEFAULT_METHODS,
    FEW_SHOT,
    FIXED_LR,
    FULL_FIXED_LR,
    MAX_WIDENING,
    METHODS_BY_KEY,
    QUICK,
    RECIPES,
    SEEDS,
    SHIFT_SETS,
    BenchmarkMethod,
    Job,
    Settings,
    job_overrides,
    max_steps,
)
from kr_vlm.benchmarks.mini.report import Report, write_outputs
from kr_vlm.benchmarks.mini.runner import run_benchmark, run_job
from kr_vlm.benchmarks.mini.selection import RateChoice, choose_rate, next_rate_out

__all__ = [
    "ALPHAS",
    "AUTHORS",
    "BASE_OVERRIDES",
    "BASE_TO_NEW",
    "CLIP_LORA",
    "CROSS_SETS",
    "DEFAULT_METHODS",
    "FEW_SHOT",
    "FIXED_LR",
    "FULL_FIXED_LR",
    "MAX_WIDENING",
    "BENCHMARK_METHODS",
    "METHODS_BY_KEY",
    "QUICK",
    "RECIPES",
    "SEEDS",
    "SHIFT_SETS",
    "BenchmarkMethod",
    "BenchmarkPlan",
    "Job",
    "RateChoice",
    "Report",
    "Settings",
    "choose_rate",
    "job_overrides",
    "max_steps",
    "next_rate_out",
    "run_benchmark",
    "run_job",
    "write_outputs",
]
