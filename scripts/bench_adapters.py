"""Step time and peak memory of one training step: KRAdapter against its floor, LoRA and the other methods.

The benchmark is ``kr_vlm.benchmarks.adapters`` (what is measured and how: its docstring); this script
runs it from the command line and prints a Markdown table:

    python scripts/bench_adapters.py --steps 5 --warmup 1 [--targets all] [--methods kradapter lora floor]
    python scripts/bench_adapters.py --model llama-tiny [--compile]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from kr_vlm.benchmarks.adapters import (
    COMPILED_METHODS,
    METHODS,
    WORKLOADS,
    build_base_model,
    build_llama,
    compiled_vs_eager,
    device_description,
    kr_vs_lora,
    make_batch,
    make_llama_batch,
    markdown_table,
    run_benchmark,
    summarize,
)

STEP = {
    "clip": "forward of both towers, CLIP loss, backward, AdamW; 224 px images and captions",
    "llama-tiny": "forward, causal LM loss, backward, AdamW; random token ids",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="clip", choices=list(WORKLOADS), help="clip: ViT-B-16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (median; at least 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per method first")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--targets", default="mlp", choices=["mlp", "all"])
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help=f"also time {' and '.join(COMPILED_METHODS)} compiled with torch.compile (inductor)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be at least 3 (the step time is a median)")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark from command-line arguments; print a Markdown table; return the rows."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    workload = WORKLOADS[args.model]
    targets = workload.target_sets[args.targets]
    if args.model == "llama-tiny":
        base_model = build_llama(device)
        batch = make_llama_batch(base_model, args.batch_size, device)
    else:
        base_model = build_base_model(targets, device)
        batch = make_batch(base_model, args.batch_size, device)
    compiled_methods = [name for name in COMPILED_METHODS if name in args.methods] if args.compile else []
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    with torch.autocast(device.type, dtype=dtype, enabled=args.precision == "bf16"):
        runs = run_benchmark(
            base_model, args.methods, targets, batch, args.steps, args.warmup, workload, compiled_methods
        )
    rows = summarize(runs)

    where = device_description(device)
    memory_source = "CUDA allocator peak" if device.type == "cuda" else "profiler allocation events"
    print(
        f"{workload.name} (random init), one training step ({STEP[args.model]}), batch {args.batch_size}, "
        f"{args.precision}, targets {args.targets} ({', '.join(targets)}), {where}, torch {torch.__version__}; "
        f"median of {args.steps} steps after {args.warmup} warm-up, methods interleaved; "
        f"time / LoRA and time / floor = median of the per-round ratios.\n"
        f"floor = frozen + the dense weight gradient of every targeted linear (no optimizer state); "
        f"frozen = gradients to the input embeddings only.\n"
        f"Peak memory = parameters + buffers + optimizer state + peak of the step's allocations "
        f"({memory_source}); the inputs are not counted.\n"
    )
    print(markdown_table(rows))
    verdict = kr_vs_lora(rows)
    if verdict:
        print(f"\n{verdict}")
    compiled = compiled_vs_eager(rows)
    if compiled:
        print(compiled)
    if args.json:
        meta = {key: value for key, value in vars(args).items() if key != "json"}
        meta.update(device_name=where, torch=torch.__version__, target_layers=list(targets))
        with open(args.json, "w") as file:
            json.dump(
                {"config": meta, "rows": rows, "kr_vs_lora": verdict, "compiled_vs_eager": compiled},
                file,
                indent=2,
            )
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
