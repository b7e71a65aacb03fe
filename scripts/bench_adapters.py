"""Step time and peak memory of one CLIP training step: KRAdapter against LoRA and the other baselines.

The benchmark is ``kr_vlm.benchmarks.adapters`` (what is measured and how: its docstring); this script
runs it from the command line and prints a Markdown table:

    python scripts/bench_adapters.py --steps 5 --warmup 1 [--targets all] [--methods kradapter lora frozen]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from kr_vlm.benchmarks.adapters import (
    METHODS,
    MODEL_NAME,
    TARGET_SETS,
    build_base_model,
    device_description,
    kr_vs_lora,
    make_batch,
    markdown_table,
    run_benchmark,
    summarize,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (median; at least 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per method first")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--targets", default="mlp", choices=list(TARGET_SETS))
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
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
    targets = TARGET_SETS[args.targets]
    base_model = build_base_model(targets, device)
    images, tokens = make_batch(base_model, args.batch_size, device)
    runs = run_benchmark(base_model, args.methods, targets, images, tokens, args.steps, args.warmup)
    rows = summarize(runs)

    where = device_description(device)
    memory_source = "CUDA allocator peak" if device.type == "cuda" else "profiler allocation events"
    print(
        f"{MODEL_NAME} (random init), one training step (forward, CLIP loss, backward, AdamW), batch "
        f"{args.batch_size}, targets {args.targets} ({', '.join(targets)}), {where}, torch {torch.__version__}; "
        f"median of {args.steps} steps after {args.warmup} warm-up, methods interleaved; "
        f"time / LoRA = median of the per-round ratios.\n"
        f"Peak memory = parameters + buffers + optimizer state + peak of the step's allocations "
        f"({memory_source}); the inputs are not counted.\n"
    )
    print(markdown_table(rows))
    verdict = kr_vs_lora(rows)
    if verdict:
        print(f"\n{verdict}")
    if args.json:
        meta = {key: value for key, value in vars(args).items() if key != "json"}
        meta.update(device_name=where, torch=torch.__version__, target_layers=list(targets))
        with open(args.json, "w") as file:
            json.dump({"config": meta, "rows": rows, "kr_vs_lora": verdict}, file, indent=2)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
