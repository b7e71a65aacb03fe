"""Step time and peak memory of one training step: KRAdapter against its floor, LoRA and the other methods.

What is trained: ``kr_vlm.benchmarks.training_step``; how it is measured (one model at a time, interleaved rounds,
median of per-round ratios): ``kr_vlm.benchmarks.training_step_sweep``. This script runs a sweep over batch sizes
and precisions, prints a line a method and round on stderr and a Markdown table a sweep point on stdout:

    python scripts/bench_adapters.py --targets all --methods kradapter lora floor --batch-sizes 1 8 32 \\
        --precision fp32 bf16 [--markdown docs/bench_adapters.md]
    python scripts/bench_adapters.py --model llama-tiny [--compile]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from kr_vlm.benchmarks.provenance import Provenance, markdown_lines
from kr_vlm.benchmarks.training_step import (
    COMPILED_METHODS,
    METHOD_BUILDERS,
    PRECISIONS,
    WORKLOADS,
    build_base_model,
    build_llama,
    device_description,
    make_batch,
    make_llama_batch,
)
from kr_vlm.benchmarks.training_step_sweep import (
    compiled_vs_eager,
    kradapter_verdict,
    markdown_table,
    measure,
    summarize,
    sweep_summary,
    sweep_verdict,
)
from kr_vlm.errors import command_boundary
from kr_vlm.files import write_json_atomic, write_text_atomic

STEP = {
    "clip": "forward of both towers, CLIP loss, backward, AdamW; 224 px images and captions",
    "llama-tiny": "forward, causal LM loss, backward, AdamW; random token ids",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="clip", choices=list(WORKLOADS), help="clip: ViT-B-16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--batch-sizes", "--batch-size", dest="batch_sizes", type=int, nargs="+", default=[8], metavar="N"
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["fp32"],
        choices=list(PRECISIONS),
        help="bf16: the forward pass under autocast, as Lightning's bf16-mixed",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every method (ratios: their median)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per method and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after each build")
    parser.add_argument("--methods", nargs="+", default=list(METHOD_BUILDERS), choices=list(METHOD_BUILDERS))
    parser.add_argument("--targets", default="mlp", choices=["mlp", "all"])
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help=f"also time {' and '.join(COMPILED_METHODS)} compiled with torch.compile (inductor)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--markdown", metavar="PATH", help="also write the tables, the command, date, machine and load here"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        parser.error(
            f"--rounds and --steps must be at least 1 and --warmup at least 0, got {args.rounds}, "
            f"{args.steps} and {args.warmup}"
        )
    if min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes must be positive, got {args.batch_sizes}")
    return args


def header(args: argparse.Namespace, targets: Sequence[str], device: torch.device) -> str:
    memory_source = "CUDA allocator peak" if device.type == "cuda" else "profiler allocation events"
    cpu_time = ", CPU time = the process's user + system time (all threads)" if device.type == "cpu" else ""
    return (
        f"{WORKLOADS[args.model].name} (random init), one training step ({STEP[args.model]}), "
        f"targets {args.targets} ({', '.join(targets)}), {device_description(device)}, torch {torch.__version__}; "
        f"{args.rounds} rounds, each building every method's model afresh, {args.warmup} warm-up and "
        f"{args.steps} timed step(s) a method, one model alive at a time; step time = median over rounds, "
        f"x floor and x LoRA = median of the per-round ratios{cpu_time}.\n"
        "floor = frozen + the dense weight gradient of every targeted linear (no optimizer state); "
        "frozen = gradients to the input embeddings only.\n"
        "Peak memory = parameters + buffers + optimizer state + peak of the step's allocations "
        f"({memory_source}); the inputs are not counted."
    )


def markdown_page(report: dict) -> str:
    """The docs page: what was run, where, how loaded the machine was, and the tables."""
    lines = [
        "# Training step: KRAdapter against its floor, LoRA and the other methods",
        "",
        "Generated by `scripts/bench_adapters.py` (what is measured and how: `kr_vlm.benchmarks.training_step` and "
        "`kr_vlm.benchmarks.training_step_sweep`).",
        "",
        *markdown_lines(report["provenance"], report["device"]),
        "",
        report["header"],
        "",
    ]
    for point in report["points"]:
        lines += [
            f"## {point['precision']}, batch {point['batch_size']}",
            "",
            markdown_table(point["rows"]),
            "",
        ]
        lines += [line for line in (point["verdict"], point["compiled"]) if line] + [""]
    if len(report["points"]) > 1:
        lines += ["## KRAdapter at every point", "", sweep_summary(report["points"]), ""]
        lines += [line for line in [sweep_verdict(report["points"])] if line] + [""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the sweep from command-line arguments; print the tables; return the report."""
    args = parse_args(argv)
    provenance = Provenance.start("scripts/bench_adapters.py", sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    workload = WORKLOADS[args.model]
    targets = workload.target_sets[args.targets]
    if args.model == "llama-tiny":
        base_model, make = build_llama(device), make_llama_batch
    else:
        base_model, make = build_base_model(targets, device), make_batch
    compiled_methods = [name for name in COMPILED_METHODS if name in args.methods] if args.compile else []
    on_cpu = device.type == "cpu"
    print(header(args, targets, device) + "\n")
    points = []
    for precision in args.precision:
        for batch_size in args.batch_sizes:
            where = f"[{precision}, batch {batch_size}]"
            measurements = measure(
                base_model,
                args.methods,
                targets,
                make(base_model, batch_size, device),
                precision,
                args.rounds,
                args.steps,
                args.warmup,
                workload,
                compiled_methods,
                progress=lambda line, where=where: print(f"{where} {line}", file=sys.stderr, flush=True),
            )
            rows = summarize(measurements, on_cpu)
            point = {"precision": precision, "batch_size": batch_size, "rows": rows}
            point.update(verdict=kradapter_verdict(rows), compiled=compiled_vs_eager(rows))
            points.append(point)
            print(f"### {precision}, batch {batch_size}\n\n{markdown_table(rows)}\n")
            for line in (point["verdict"], point["compiled"]):
                if line:
                    print(line)
            print(flush=True)
    if len(points) > 1:
        print(f"### KRAdapter at every point\n\n{sweep_summary(points)}\n")
        verdict = sweep_verdict(points)
        if verdict:
            print(verdict)
    report = {
        "provenance": provenance.record(),
        "device": device_description(device),
        "header": header(args, targets, device),
        "config": {key: value for key, value in vars(args).items() if key not in ("json", "markdown")},
        "target_layers": list(targets),
        "points": points,
    }
    if args.json:
        write_json_atomic(Path(args.json), report)
    if args.markdown:
        write_text_atomic(Path(args.markdown), markdown_page(report))
    return report


if __name__ == "__main__":
    with command_boundary():
        main(sys.argv[1:])
