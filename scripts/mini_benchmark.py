"""The papers' evaluation in miniature on the shipped miniature CLIP, offline, in one command.

Zero-shot, KRAdapter, LoRA (six linears, and CLIP-LoRA's q k v), VeRA, RandLoRA and full fine-tuning (DoRA,
LoKr and LoHa with --methods) at 16 shots x 3 seeds on the digits, tested on clean digits (ID), the shifted
digits domains and glyphs in held-out fonts, and base-to-new on digits 0-4 / 5-9, each trained model at
several update scales α. Three modes: CLIP-LoRA's recipe at every rate of each method's grid, reported at the
rate chosen on 16 validation digits a class and at one fixed rate; and the KRAdapter authors' recipe at their
rates. The protocol and every choice: kr_vlm.benchmarks.mini.

    python scripts/mini_benchmark.py                            # the report beside the runs, logs/mini_benchmark/<time>
    python scripts/mini_benchmark.py --out docs                 # the same, refreshing docs/mini_benchmark.md
    python scripts/mini_benchmark.py --quick --out /tmp/mini    # every mode, small: a few minutes
    python scripts/mini_benchmark.py --methods zero_shot kradapter lora --recipes clip_lora
    python scripts/mini_benchmark.py --workers 1 trainer.max_steps=5   # Hydra overrides, every run

Writes mini_benchmark.md, .csv, .json, .png and the frontier figures (mini_benchmark_frontier.png,
mini_benchmark_frontier_authors.png) to --out (default: beside the runs); the runs' folders go to --runs-dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from kr_vlm.benchmarks.mini import BENCHMARK_METHODS, QUICK, RECIPES, Settings, run_benchmark, write_outputs
from kr_vlm.errors import command_boundary
from kr_vlm.files import new_output_folder


def build_parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Arguments KEY=VALUE or ~KEY (anywhere on the line) are Hydra overrides for every run, applied "
        "after the benchmark's own, e.g. trainer.max_steps=5.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder of the report (default: the runs' folder; --out docs refreshes docs/)",
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=None,
        help="a new folder for the runs (default: logs/mini_benchmark/<time>)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="every mode, small: zero-shot, KRAdapter and LoRA, two rates, one seed, 10 steps, one authors' "
        "epoch (the options below change it further)",
    )
    keys = [method.key for method in BENCHMARK_METHODS]
    parser.add_argument(
        "--methods", nargs="+", help=f"from: {' '.join(keys)} (default: {' '.join(defaults.methods)})"
    )
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, help="default: both")
    parser.add_argument("--seeds", nargs="+", type=int, help=f"default: {' '.join(map(str, defaults.seeds))}")
    parser.add_argument(
        "--shots",
        nargs="+",
        type=int,
        help="shot counts (default 16; others run at the chosen and fixed rates)",
    )
    parser.add_argument(
        "--alphas",
        nargs="+",
        type=float,
        help=f"update scales (default: {' '.join(f'{a:g}' for a in defaults.alphas)})",
    )
    parser.add_argument(
        "--steps", type=int, help=f"CLIP-LoRA recipe's steps at 16 shots (default {defaults.steps})"
    )
    parser.add_argument(
        "--val-shots", type=int, help=f"validation digits a class (default {defaults.val_shots})"
    )
    parser.add_argument(
        "--grid",
        nargs="+",
        type=int,
        help=f"exponents k of the grid fixed rate x 2**k (default {' '.join(map(str, defaults.grid_exponents))})",
    )
    parser.add_argument("--max-widening", type=int, help=f"default {defaults.max_widening}")
    parser.add_argument(
        "--workers", type=int, help="worker processes, one thread each; 1: in this process (default 2)"
    )
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Settings]:
    # Hydra's overrides (key=value, +key=value, ~key) are told apart from options and their values by their
    # "=" or "~"; none starts with "-".
    overrides = [arg for arg in argv if not arg.startswith("-") and ("=" in arg or arg.startswith("~"))]
    args = build_parser().parse_args([arg for arg in argv if arg not in overrides])
    settings = QUICK if args.quick else Settings()
    given = {
        "methods": args.methods,
        "recipes": args.recipes,
        "seeds": args.seeds,
        "shots": args.shots,
        "alphas": args.alphas,
        "grid_exponents": args.grid,
    }
    changes = {key: tuple(value) for key, value in given.items() if value is not None}
    for key, value in (
        ("steps", args.steps),
        ("val_shots", args.val_shots),
        ("max_widening", args.max_widening),
        ("workers", args.workers),
    ):
        if value is not None:
            changes[key] = value
    return args, dataclasses.replace(settings, **changes, overrides=tuple(overrides))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, settings = parse_args(argv)
    command = shlex.join(["python", "scripts/mini_benchmark.py", *argv])
    runs_dir = args.runs_dir or new_output_folder("mini_benchmark")
    settings.check()
    print(f"Runs go to {runs_dir}", flush=True)
    benchmark = run_benchmark(settings, runs_dir, log=lambda line: print(line, flush=True))
    paths = write_outputs(benchmark, runs_dir, args.out or runs_dir, command)
    timing = benchmark["timing"]
    print(
        f"\n{timing['wall_time_s'] / 60:.1f} min of wall time, {timing['cpu_time_s'] / 60:.1f} min of CPU time for "
        f"{timing['runs']} runs. The report: {paths['md']} (and "
        + ", ".join(str(path) for kind, path in paths.items() if kind != "md")
        + ")"
    )
    return 0


if __name__ == "__main__":
    with command_boundary():
        sys.exit(main())
