"""What ``EffectiveRankMonitor`` costs next to training, for ViT-B-16 with KRAdapter on every block linear.

The model: open_clip ``ViT-B-16`` (random init, nothing downloaded), attention converted to separate
q/k/v/out linears, KRAdapter on ``attn.q_proj/k_proj/v_proj/out_proj`` and ``mlp.c_fc/c_proj`` of all 12
blocks of both towers: 144 updates (vision 768x768 and 768x3072, text 512x512 and 512x2048). ``--model-name``
takes another open_clip model (a small one such as ``ViT-S-32`` for a quick check of the script).

Measured in one run, on one device, reusing ``kr_vlm.benchmarks.training_step`` (what ``scripts/bench_adapters.py``
times) for the training step (forward of both towers, CLIP loss, backward, AdamW):

- in the training thread (``background=False``): the median time of one evaluation,
  ``EffectiveRankMonitor.evaluate`` (snapshot, every layer's exact spectrum, the metrics) plus rewriting
  ``rank_history.json``, alternating with training steps so the updates are not zero;
- with the background thread (the default): rounds of two windows of training steps, one while an evaluation
  runs in the background (started at the window's first step, collected and written as the callback does;
  the window goes on until it has finished and at least ``--window-steps`` steps ran), one with no
  evaluation and as many steps, in alternating order. The background evaluation's cost is the difference of
  the two windows' times: the work left in the training thread (snapshot, logging) plus whatever CPU the
  background thread took from training. Median over the rounds, each round's figure shown too;
- optionally (``--dense-svd``) the previous way, a float32 SVD of every dense ``delta_weight()`` on one thread;
- the time of the report written once at train end (plots and HTML), shown apart.

Overhead at interval N = cost of one evaluation / (N x step time): the fraction of training time it adds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from kr_vlm import spectral
from kr_vlm.adapters import adapted_layers
from kr_vlm.benchmarks.provenance import Provenance, markdown_lines
from kr_vlm.benchmarks.training_step import (
    MODEL_NAME,
    TARGET_SETS,
    MethodRun,
    build_base_model,
    build_run,
    device_description,
    make_batch,
    synchronize,
    timed_step,
)
from kr_vlm.callbacks.rank_evaluation import _intra_op_threads
from kr_vlm.callbacks.rank_monitor import EffectiveRankMonitor
from kr_vlm.errors import command_boundary
from kr_vlm.files import write_text_atomic
from kr_vlm.table_text import markdown_table

INTERVALS = (50, 100, 200, 500)


def timed(function: Callable[[], object], device: torch.device) -> float:
    """Seconds ``function()`` takes, with the device's queued work waited for."""
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - started


def foreground_evaluation(monitor: EffectiveRankMonitor, model: torch.nn.Module, step: int) -> None:
    """What one evaluation does in the training thread with ``background=False``."""
    monitor.evaluate(model, step)
    monitor.write_history()


def background_window(
    run: MethodRun, step_once: Callable[[], float], monitor: EffectiveRankMonitor, step: int, min_steps: int
) -> tuple[float, int]:
    """Seconds and steps of a window of training steps while one background evaluation runs to completion."""
    started = time.perf_counter()
    monitor.evaluate_in_background(run.model, step)
    steps, finished = 0, []
    while steps < min_steps or not finished:
        step_once()
        steps += 1
        finished = finished or monitor.collect()
    monitor.write_history()
    return time.perf_counter() - started, steps


def plain_window(step_once: Callable[[], float], steps: int) -> float:
    return sum(step_once() for _ in range(steps))


def dense_svd_seconds(model: torch.nn.Module) -> float:
    """One evaluation the previous way: a float32 SVD of every dense update, one thread."""
    started = time.perf_counter()
    with torch.no_grad(), _intra_op_threads(1):
        for _, layer in adapted_layers(model):
            spectral.singular_values(layer.delta_weight())
    return time.perf_counter() - started


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--model-name", default=MODEL_NAME, help="open_clip model (random init); a small one for a dry run"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed evaluations in the training thread, and rounds of windows",
    )
    parser.add_argument("--window-steps", type=int, default=2, help="fewest training steps in a window")
    parser.add_argument(
        "--cpu-threads", type=int, default=1, help="the monitor's cpu_threads (0: torch's current setting)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps and evaluations first")
    parser.add_argument(
        "--dense-svd", action="store_true", help="also time the previous dense-SVD evaluation"
    )
    parser.add_argument(
        "--markdown", metavar="PATH", help="also write the results, command, date and load here"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.window_steps < 1:
        parser.error("--repeats and --window-steps must be at least 1, --warmup at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the benchmark, print the overhead table, return the measured figures."""
    args = parse_args(argv)
    provenance = Provenance.start("scripts/bench_rank_monitor.py", sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    targets = TARGET_SETS["all"]
    run = build_run("kradapter", build_base_model(targets, device, args.model_name), targets)
    layers = list(adapted_layers(run.model))
    batch = make_batch(run.model, args.batch_size, device)
    cpu_threads = args.cpu_threads or None

    step_seconds: list[float] = []

    def step_once() -> float:
        seconds = timed_step(run, batch) / 1000
        step_seconds.append(seconds)
        return seconds

    with tempfile.TemporaryDirectory() as output_dir:
        monitor = EffectiveRankMonitor(output_dir=output_dir, cpu_threads=cpu_threads)
        # In the training thread: steps and evaluations alternate, so a shared machine's drifts hit both alike.
        foreground = []
        for index in range(args.warmup + args.repeats):
            step_once()
            seconds = timed(lambda index=index: foreground_evaluation(monitor, run.model, index), device)
            if index >= args.warmup:
                foreground.append(seconds)
        del step_seconds[: args.warmup]

        # With the background thread: paired windows, the order alternating by round.
        background, background_steps = [], []
        planned = args.window_steps
        for index in range(args.repeats):
            step = args.warmup + args.repeats + index
            if index % 2 == 0:
                with_seconds, steps = background_window(run, step_once, monitor, step, args.window_steps)
                without_seconds = plain_window(step_once, steps)
            else:  # as many steps as the last window with an evaluation took, scaled if this one took more or fewer
                without_seconds = plain_window(step_once, planned)
                with_seconds, steps = background_window(run, step_once, monitor, step, args.window_steps)
                without_seconds *= steps / planned
            planned = steps
            background.append(with_seconds - without_seconds)
            background_steps.append(steps)
        dense_seconds = dense_svd_seconds(run.model) if args.dense_svd else None

        monitor.close()
        started = time.perf_counter()
        monitor.write_report()
        report_seconds = time.perf_counter() - started
        evaluation_work = statistics.median(record["seconds"] for record in monitor.records[args.warmup :])

    step_time = statistics.median(step_seconds)
    foreground_time = statistics.median(foreground)
    background_time = statistics.median(background)
    where = device_description(device)
    shapes = sorted({(layer.out_features, layer.in_features) for _, layer in layers})
    lines = [
        f"{args.model_name} (random init), KRAdapter on {', '.join(targets)} of both towers: {len(layers)} updates "
        f"of shapes {', '.join(f'{o}x{i}' for o, i in shapes)}; {where}, torch {torch.__version__}.\n"
        f"Training step (forward, CLIP loss, backward, AdamW; batch {args.batch_size}, 224 px): "
        f"median {step_time:.2f} s of {len(step_seconds)}.\n"
        f"Evaluation in the training thread (snapshot + exact spectra + metrics + rank_history.json; "
        f"cpu_threads={cpu_threads}): median {foreground_time:.2f} s of {args.repeats}; the decomposition "
        f"work of an evaluation, wherever it ran: median {evaluation_work:.2f} s.\n"
        f"Background evaluation: training time with it minus without, per round: "
        f"{', '.join(f'{seconds:+.2f} s' for seconds in background)} (windows of "
        f"{', '.join(map(str, background_steps))} steps); median {background_time:+.2f} s.\n"
        + (
            f"The previous evaluation (float32 SVD of every dense update, 1 thread): {dense_seconds:.2f} s.\n"
            if dense_seconds is not None
            else ""
        )
        + f"Report at train end (2 plots + HTML), once per run: {report_seconds:.2f} s.\n"
    ]
    header = ["every_n_steps", *(["previous: dense SVD"] if dense_seconds is not None else [])]
    header += ["in the training thread", "background thread (default)"]
    rows = []
    figures = {
        "step_seconds": step_time,
        "foreground_evaluation_seconds": foreground_time,
        "evaluation_work_seconds": evaluation_work,
        "background_evaluation_seconds": background_time,
        "report_seconds": report_seconds,
    }
    if dense_seconds is not None:
        figures["dense_svd_seconds"] = dense_seconds
    for interval in INTERVALS:
        foreground_overhead = 100 * foreground_time / (interval * step_time)
        background_overhead = 100 * background_time / (interval * step_time)
        figures[f"overhead_percent_every_{interval}"] = background_overhead
        figures[f"foreground_overhead_percent_every_{interval}"] = foreground_overhead
        dense_cell = []
        if dense_seconds is not None:
            figures[f"dense_svd_overhead_percent_every_{interval}"] = dense_overhead = (
                100 * dense_seconds / (interval * step_time)
            )
            dense_cell = [f"{dense_overhead:.2f} %"]
        rows.append([interval, *dense_cell, f"{foreground_overhead:.2f} %", f"{background_overhead:.2f} %"])
    lines.append(markdown_table(header, rows, "right"))
    print("\n".join(lines))
    if args.markdown:
        page = ["# Effective-rank monitor overhead", "", "Generated by `scripts/bench_rank_monitor.py`.", ""]
        page += markdown_lines(provenance.record(), where) + ["", *lines, ""]
        write_text_atomic(Path(args.markdown), "\n".join(page))
    return figures


if __name__ == "__main__":
    with command_boundary():
        main(sys.argv[1:])
