"""The papers' evaluation in miniature on the shipped miniature CLIP, offline, in one command.

Zero-shot, KRAdapter, LoRA, DoRA, VeRA, LoKr, LoHa, RandLoRA and full fine-tuning on the same six linears of
both towers (and LoRA as CLIP-LoRA places it), each at the learning rate its grid's best run scores on the
validation shots; 1, 4 and 16 shots x 3 seeds on the digits, tested on clean digits, the shifted digits
domains and glyphs in held-out fonts; base-to-new on digits 0-4 / 5-9. The protocol and every choice:
kr_vlm.benchmarks.mini.

    python scripts/mini_benchmark.py --out docs            # the README's tables and plot
    python scripts/mini_benchmark.py --methods zero_shot kradapter lora --seeds 1
    python scripts/mini_benchmark.py --workers 1 --seeds 1 trainer.max_steps=5   # Hydra overrides, every run

Writes mini_benchmark.md, .csv, .json and .png to --out; the runs' folders go to --runs-dir.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

from kr_vlm.benchmarks.mini import (
    METHODS,
    SEEDS,
    SHOTS,
    Settings,
    benchmark_tables,
    run_benchmark,
    write_outputs,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/mini_benchmark"), help="folder of the tables and plot"
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=None,
        help="a new folder for the runs' folders (default: logs/mini_benchmark/<date>_<time>)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="worker processes, one CPU thread each (1: runs in this process)",
    )
    keys = [method.key for method in METHODS]
    parser.add_argument("--methods", nargs="+", default=keys, help=f"from: {' '.join(keys)}")
    parser.add_argument("--shots", nargs="+", type=int, default=list(SHOTS), help="shots per class (keep 16)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="seeds (keep 1)")
    parser.add_argument(
        "--lrs",
        nargs="+",
        type=float,
        default=None,
        help="one learning-rate grid for every method (default: each its own)",
    )
    parser.epilog = (
        "Arguments KEY=VALUE or ~KEY (anywhere, not after an option that takes values) are Hydra overrides "
        "for every run, applied after the benchmark's own, e.g. trainer.max_steps=5 or paths.data_dir=..."
    )
    argv = sys.argv[1:] if argv is None else argv
    # Hydra's overrides (key=value, +key=value, ~key) are told apart from options and their values by
    # their "=" or "~"; none starts with "-".
    overrides = [arg for arg in argv if not arg.startswith("-") and ("=" in arg or arg.startswith("~"))]
    args = parser.parse_args([arg for arg in argv if arg not in overrides])
    args.overrides = overrides
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "scripts/mini_benchmark.py", *(sys.argv[1:] if argv is None else argv)])
    runs_dir = args.runs_dir or Path("logs/mini_benchmark") / datetime.datetime.now().strftime(
        "%Y-%m-%d_%H-%M-%S"
    )
    settings = Settings(
        methods=tuple(args.methods),
        shots=tuple(args.shots),
        seeds=tuple(args.seeds),
        workers=args.workers,
        lrs=None if args.lrs is None else tuple(args.lrs),
        overrides=tuple(args.overrides),
    )
    try:
        settings.check()
        print(f"Runs go to {runs_dir}", flush=True)
        results = run_benchmark(settings, runs_dir, log=lambda line: print(line, flush=True))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    paths = write_outputs(results, args.out, command)
    print()
    print("\n".join(table.markdown() for table in benchmark_tables(results)))
    timing = results["timing"]
    print(
        f"{timing['wall_time_s'] / 60:.1f} min of wall time, {timing['cpu_time_s'] / 60:.1f} min of CPU time. Wrote "
        + ", ".join(map(str, paths.values()))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
