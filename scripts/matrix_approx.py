"""The KRAdapter paper's synthetic matrix approximation benchmark (arXiv 2508.00230), in one command.

Every method fits each target matrix with its own adapter layer at a matched trainable-parameter budget;
see kr_vlm.benchmarks.matrix_approx for the targets and the choices made.

    python scripts/matrix_approx.py                      # the paper's settings: 1024x768, 300 steps
    python scripts/matrix_approx.py --out docs           # refresh the README's table and plot in docs/
    python scripts/matrix_approx.py --threads 1          # on a busy shared CPU: avoids thread contention
    python scripts/matrix_approx.py --quick --families gaussian lowrank
    python scripts/matrix_approx.py --families checkpoint:model.pt:transformer.resblocks.0.attn.in_proj_weight

Writes matrix_approx.json, matrix_approx.md (errors relative to LoRA) and matrix_approx.png to --out
(default: a new folder, logs/matrix_approx/<date>_<time>, printed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from kr_vlm.benchmarks.matrix_approx import (
    COMPARED_METHODS,
    FAMILIES,
    METHOD_LABELS,
    QUICK_SETTINGS,
    BenchmarkSettings,
    check_methods,
    make_targets,
    method_setup,
    parse_size,
    results_markdown,
    run_benchmark,
    write_outputs,
)
from kr_vlm.errors import command_boundary
from kr_vlm.files import new_output_folder


def size_argument(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=size_argument, default=None, help="D_OUTxD_IN (default 1024x768)")
    parser.add_argument("--steps", type=int, default=None, help="AdamW steps per fit (default 300)")
    parser.add_argument("--lr", type=float, default=BenchmarkSettings.lr, help="AdamW learning rate (0.1)")
    parser.add_argument(
        "--methods", nargs="+", default=list(COMPARED_METHODS), help=f"from: {' '.join(COMPARED_METHODS)}"
    )
    parser.add_argument(
        "--families",
        nargs="+",
        default=list(FAMILIES),
        help=f"from: {' '.join(FAMILIES)}, checkpoint:PATH:KEY",
    )
    parser.add_argument("--device", default=BenchmarkSettings.device, help="torch device (cpu, cuda, ...)")
    parser.add_argument("--seed", type=int, default=BenchmarkSettings.seed)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice); 1 is much faster on a busy, shared CPU",
    )
    parser.add_argument(
        "--budget", type=int, default=None, help="trainable parameters (default 2*min*sqrt(max))"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: logs/matrix_approx/<date>_<time>; --out docs refreshes docs/)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="256x192 and 100 steps unless --size / --steps say otherwise"
    )
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> BenchmarkSettings:
    defaults = QUICK_SETTINGS if args.quick else {}
    d_out, d_in = args.size or (
        defaults.get("d_out", BenchmarkSettings.d_out),
        defaults.get("d_in", BenchmarkSettings.d_in),
    )
    steps = args.steps or defaults.get("steps", BenchmarkSettings.steps)
    return BenchmarkSettings(
        d_out=d_out,
        d_in=d_in,
        steps=steps,
        lr=args.lr,
        seed=args.seed,
        budget=args.budget,
        device=args.device,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from_args(args)
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be at least 1, got {args.threads}.")
            torch.set_num_threads(args.threads)
        check_methods(args.methods)
        targets = make_targets(args.families, settings)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"{settings.d_out}x{settings.d_in}, budget {settings.parameter_budget:,} trainable parameters, "
        f"LoRA rank {settings.lora_rank}, AdamW lr {settings.lr:g}, {settings.steps} steps, "
        f"seed {settings.seed}, device {settings.device}"
    )
    for method in args.methods:
        setup = method_setup(method, settings)
        options = ", ".join(f"{key}={value}" for key, value in setup.options.items()) or "-"
        print(f"  {METHOD_LABELS[method]:>12}: {setup.expected_parameters:>9,} trainable ({options})")
    out = args.out or new_output_folder("matrix_approx")
    print(f"The outputs go to {out}", flush=True)
    results = run_benchmark(settings, targets, args.methods, log=lambda line: print(line, flush=True))
    paths = write_outputs(results, out)
    print()
    print(results_markdown(results))
    print("Wrote " + ", ".join(str(path) for path in paths.values()))
    return 0


if __name__ == "__main__":
    with command_boundary():
        sys.exit(main())
