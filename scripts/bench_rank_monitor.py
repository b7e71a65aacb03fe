"""What ``EffectiveRankMonitor`` costs next to training, for ViT-B-16 with KRAdapter on every block linear.

The model: open_clip ``ViT-B-16`` (random init, nothing downloaded), attention converted to separate
q/k/v/out linears, KRAdapter on ``attn.q_proj/k_proj/v_proj/out_proj`` and ``mlp.c_fc/c_proj`` of all 12
blocks of both towers: 144 updates (vision 768x768 and 768x3072, text 512x512 and 512x2048).

Measured in one run, on one device:
- the median time of one training step (forward of both towers, CLIP loss, backward, AdamW), reusing
  ``kr_vlm.benchmarks.adapters`` (what ``scripts/bench_adapters.py`` times);
- the median time of one monitor evaluation: ``EffectiveRankMonitor.evaluate`` (every ``delta_weight()``,
  batched singular values, the metrics) plus rewriting ``rank_history.json``: what runs every
  ``every_n_steps`` steps;
- the time of the report written once at train end (plots and HTML), shown apart.

Overhead at interval N = evaluation time / (N x step time): the fraction of training time the monitor adds.
Steps and evaluations alternate (the first of each untimed), so the updates are not zero when measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

import open_clip
import torch

from kr_vlm.adapters import adapted_layers
from kr_vlm.benchmarks.adapters import (
    TARGET_SETS,
    build_base_model,
    build_run,
    device_description,
    make_batch,
    synchronize,
    timed_step,
)
from kr_vlm.callbacks.rank_monitor import EffectiveRankMonitor

INTERVALS = (50, 100, 200, 500)


def time_evaluation(
    monitor: EffectiveRankMonitor, model: torch.nn.Module, step: int, device: torch.device
) -> float:
    """Seconds for one periodic evaluation: decompose, measure, rewrite rank_history.json."""
    synchronize(device)
    started = time.perf_counter()
    monitor.evaluate(model, step)
    monitor.write_history()
    synchronize(device)
    return time.perf_counter() - started


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed training steps and evaluations (medians)"
    )
    parser.add_argument(
        "--cpu-threads", type=int, default=1, help="the monitor's cpu_threads (0: torch's current setting)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps and evaluations first")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be at least 1 and --warmup at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the benchmark, print the overhead table, return the measured figures."""
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    targets = TARGET_SETS["all"]
    run = build_run("kradapter", build_base_model(targets, device), targets)
    layers = list(adapted_layers(run.model))
    images, tokens = make_batch(run.model, args.batch_size, device)
    loss_fn = open_clip.ClipLoss()

    # Training steps and evaluations alternate, so the drifts of a shared machine hit both alike.
    step_seconds, evaluation_seconds = [], []
    with tempfile.TemporaryDirectory() as output_dir:
        monitor = EffectiveRankMonitor(output_dir=output_dir, cpu_threads=args.cpu_threads or None)
        for index in range(args.warmup + args.repeats):
            step_time = timed_step(run, images, tokens, loss_fn) / 1000
            evaluation_time = time_evaluation(monitor, run.model, index, device)
            if index >= args.warmup:
                step_seconds.append(step_time)
                evaluation_seconds.append(evaluation_time)
        started = time.perf_counter()
        monitor.write_report()
        report_time = time.perf_counter() - started
    step_time = statistics.median(step_seconds)
    evaluation_time = statistics.median(evaluation_seconds)

    where = device_description(device)
    shapes = sorted({(layer.out_features, layer.in_features) for _, layer in layers})
    print(
        f"ViT-B-16 (random init), KRAdapter on {', '.join(targets)} of both towers: {len(layers)} updates "
        f"of shapes {', '.join(f'{o}x{i}' for o, i in shapes)}; {where}, torch {torch.__version__}.\n"
        f"Training step (forward, CLIP loss, backward, AdamW; batch {args.batch_size}, 224 px): "
        f"median {step_time:.2f} s of {args.repeats}.\n"
        f"Monitor evaluation (spectra + metrics + rank_history.json; cpu_threads={args.cpu_threads or None}): median {evaluation_time:.2f} s of "
        f"{args.repeats}, alternating with the steps.\n"
        f"Report at train end (2 plots + HTML), once per run: {report_time:.2f} s.\n"
    )
    print("| every_n_steps | overhead |")
    print("|---:|---:|")
    figures = {
        "step_seconds": step_time,
        "evaluation_seconds": evaluation_time,
        "report_seconds": report_time,
    }
    for interval in INTERVALS:
        overhead = 100 * evaluation_time / (interval * step_time)
        figures[f"overhead_percent_every_{interval}"] = overhead
        print(f"| {interval} | {overhead:.2f} % |")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
