"""KRAdapter under bf16-mixed, fp16-mixed and fp32 on the demo: accuracies, and how much of the update the
low-precision forward still sees.

KRAdapter's forward runs one matmul with the fused weight ``W0 + s ΔW``. Under autocast that weight is rounded
to the compute dtype, whose step at ``W0``'s entries (about ``2^-8`` of them in bf16, ``2^-11`` in fp16) can
exceed the update's entries early in training (``ΔW`` starts at zero): the update is then partly rounded
away in the forward pass. Backward is not affected (the factor gradients come from ``grad_yᵀ x``). This
script trains the demo (``experiment=demo``: the shipped miniature CLIP on the digits) once per precision and
seed, and, at a few steps of every run, measures for each KRAdapter layer

    lost = ‖round(W0 + s ΔW) - round(W0) - s ΔW‖_F / ‖s ΔW‖_F

for ``round`` = bf16 and fp16 (from the fp32 factors, so the same figure whichever precision the run
trains in): 0 when the forward sees the whole update, 1 when it sees none of it (or only noise of its
size). It prints the test accuracies (clean digits and the mean over the shifted domains) per precision
and seed, and the median and maximum of ``lost`` over the layers at each step, with ``‖s ΔW‖_F / ‖W0‖_F``.

On a CPU, Lightning has no fp16 autocast (``precision=16-mixed`` falls back to bf16); the script then gives
the trainer torch's CPU fp16 autocast with a gradient scaler (``MixedPrecision("16-mixed", "cpu")``).

    python scripts/bench_precision.py --seeds 1 2 3 [--precisions 32-true bf16-mixed 16-mixed]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from kr_vlm.adapters import KRAdapterLinear, adapted_layers
from kr_vlm.cli import CONFIG_DIR, train
from kr_vlm.errors import command_boundary
from kr_vlm.table_text import markdown_table

ROUNDINGS = {"bf16": torch.bfloat16, "fp16": torch.float16}
MEASURED_STEPS = (1, 2, 5, 10, 20, 50, 100, 200)
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


def lost_fraction(base: torch.Tensor, update: torch.Tensor, dtype: torch.dtype) -> float:
    """``‖round(W0 + U) - round(W0) - U‖ / ‖U‖`` in float64, ``round`` to ``dtype``: the share of the update
    ``U`` that a forward with the fused weight in ``dtype`` does not see."""
    base, update = base.double(), update.double()
    seen = (base + update).to(dtype).double() - base.to(dtype).double()
    return float(torch.linalg.matrix_norm(seen - update) / torch.linalg.matrix_norm(update))


# Every ForwardRounding built, in order (the trainer builds them from the config): a run's is the last one.
MEASUREMENTS: list[ForwardRounding] = []


class ForwardRounding(pl.Callback):
    """At ``MEASURED_STEPS``, the lost fraction of every KRAdapter layer's update under each rounding."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        MEASUREMENTS.append(self)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step not in MEASURED_STEPS or any(row["step"] == step for row in self.rows):
            return
        layers = [layer for _, layer in adapted_layers(pl_module) if isinstance(layer, KRAdapterLinear)]
        pairs = [(layer.base_weight().float(), layer.delta_weight().float()) for layer in layers]
        row = {
            "step": step,
            "relative_size": statistics.median(
                float(torch.linalg.matrix_norm(update) / torch.linalg.matrix_norm(base))
                for base, update in pairs
            ),
        }
        for name, dtype in ROUNDINGS.items():
            lost = [lost_fraction(base, update, dtype) for base, update in pairs]
            row[f"{name}_median"], row[f"{name}_max"] = statistics.median(lost), max(lost)
        self.rows.append(row)


def demo_config(root: Path, precision: str, seed: int, overrides: Sequence[str]):
    """The demo's config as ``train.py experiment=demo`` composes it, every path under ``root``."""
    paths = [f"paths.{key}={root / key}" for key in ("data_dir", "log_dir")]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "experiment=demo",
                f"seed={seed}",
                f"paths.output_dir={root / f'{precision}_seed{seed}'}",
                *paths,
                *overrides,
            ],
            return_hydra_config=True,
        )
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.callbacks.forward_rounding = {"_target_": f"{__name__}.ForwardRounding"}
        if precision == "16-mixed" and cfg.trainer.accelerator == "cpu":
            cfg.trainer.precision = None
            cfg.trainer.plugins.append(
                {
                    "_target_": "lightning.pytorch.plugins.precision.MixedPrecision",
                    "precision": "16-mixed",
                    "device": "cpu",
                }
            )
        else:
            cfg.trainer.precision = precision
    return cfg


def run(root: Path, precision: str, seed: int, overrides: Sequence[str]) -> tuple[dict, list[dict]]:
    """Train the demo once; its metrics and the rounding rows its ForwardRounding callback measured."""
    cfg = demo_config(root, precision, seed, overrides)
    try:
        metrics = train(cfg)
    finally:
        HydraConfig.instance().cfg = None
    return metrics, MEASUREMENTS[-1].rows


def accuracies(metrics: dict) -> tuple[float, float]:
    """Top-1 on the clean digits and the mean top-1 over the shifted domains."""
    tests = {name: 100 * values["top1"] for name, values in metrics["test"].items()}
    shifted = [value for name, value in tests.items() if name != "digits"]
    return tests["digits"], statistics.mean(shifted) if shifted else float("nan")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every run (e.g. trainer=gpu)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    results: dict[str, dict[int, tuple[float, float]]] = {}
    rounding: list[dict] = []
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as folder:
        for precision in args.precisions:
            for seed in args.seeds:
                metrics, rows = run(Path(folder), precision, seed, args.overrides)
                results.setdefault(precision, {})[seed] = accuracies(metrics)
                if precision == args.precisions[0] and seed == args.seeds[0]:
                    rounding = rows
                torch.set_num_threads(threads)

    print("\nTest top-1 (%) of KRAdapter on the demo, clean digits / mean of the shifted domains:\n")
    header = ["precision", *(f"seed {seed}" for seed in args.seeds), "mean"]
    rows = []
    for precision, by_seed in results.items():
        cells = [f"{clean:.1f} / {shifted:.1f}" for clean, shifted in by_seed.values()]
        mean_clean = statistics.mean(clean for clean, _ in by_seed.values())
        mean_shifted = statistics.mean(shifted for _, shifted in by_seed.values())
        rows.append([precision, *cells, f"{mean_clean:.1f} / {mean_shifted:.1f}"])
    print(markdown_table(header, rows, ["left"] + ["right"] * (len(header) - 1)))

    print(
        f"\nShare of the update s ΔW that a forward with the fused weight rounded to bf16 / fp16 does not see, "
        f"over the {len(MEASURED_STEPS)} measured steps of the {args.precisions[0]} run, seed {args.seeds[0]} "
        f"(median and max over the KRAdapter layers):\n"
    )
    header = ["step", "‖s ΔW‖ / ‖W0‖ (median)", "bf16 lost, median", "bf16 lost, max"]
    header += ["fp16 lost, median", "fp16 lost, max"]
    rows = [
        [row["step"], f"{row['relative_size']:.2e}", f"{row['bf16_median']:.3f}", f"{row['bf16_max']:.3f}"]
        + [f"{row['fp16_median']:.3f}", f"{row['fp16_max']:.3f}"]
        for row in rounding
    ]
    print(markdown_table(header, rows, "right"))
    return {"accuracies": results, "rounding": rounding}


if __name__ == "__main__":
    with command_boundary():
        main(sys.argv[1:])
