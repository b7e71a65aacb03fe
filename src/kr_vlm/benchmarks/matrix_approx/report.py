"""The matrix approximation benchmark's outputs (``kr_vlm.benchmarks.matrix_approx``): the Markdown tables, the
figure and the JSON results."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kr_vlm.benchmarks.matrix_approx.fit import METHOD_LABELS, REFERENCE_METHOD
from kr_vlm.files import write_json_atomic
from kr_vlm.table_text import markdown_table


def _relative_to_reference(results: dict[str, Any], family: str, method: str, metric: str) -> float | None:
    """``metric`` of ``method`` as a percentage of LoRA's on ``family`` (None without a LoRA run)."""
    methods = results["families"][family]["methods"]
    if REFERENCE_METHOD not in methods or methods[REFERENCE_METHOD][metric] == 0:
        return None
    return 100 * methods[method][metric] / methods[REFERENCE_METHOD][metric]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return markdown_table(header, rows).split("\n")


def _metric_table(results: dict[str, Any], metric: str, digits: int) -> list[str]:
    methods = list(results["methods"])
    rows = []
    for family, family_results in results["families"].items():
        cells = [family]
        for method in methods:
            value = family_results["methods"][method][metric]
            relative = _relative_to_reference(results, family, method, metric)
            cells.append(f"{value:.{digits}f}" + ("" if relative is None else f" ({relative:.0f}%)"))
        rows.append(cells)
    return _table(["target", *(METHOD_LABELS[m] for m in methods)], rows)


def results_markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: Frobenius and nuclear errors (with % of LoRA), effective ranks, sizes."""
    settings = results["settings"]
    methods = list(results["methods"])
    relative_note = " In brackets: as a percentage of LoRA's error." if REFERENCE_METHOD in methods else ""
    lines = [
        f"Matrix approximation, {settings['d_out']}x{settings['d_in']} targets (unit RMS, half precision), "
        f"budget {results['budget']:,} trainable parameters (LoRA rank {results['lora_rank']}), "
        f"AdamW lr {settings['lr']:g}, {settings['steps']} steps, seed {settings['seed']}.",
        "",
        f"Relative Frobenius error ||fit - T||_F / ||T||_F (lower is better).{relative_note}",
        "",
        *_metric_table(results, "relative_frobenius_error", 4),
        "",
        f"Nuclear error: mean |σ_fit - σ_T| over the sorted singular values (lower is better).{relative_note}",
        "",
        *_metric_table(results, "nuclear_error", 3),
        "",
        "Effective rank of the fit (exp of the entropy of σ / Σσ).",
        "",
    ]
    rows = [
        [family, f"{family_results['target']['effective_rank']:.1f}"]
        + [f"{family_results['methods'][m]['effective_rank']:.1f}" for m in methods]
        for family, family_results in results["families"].items()
    ]
    lines += _table(["target", "target itself", *(METHOD_LABELS[m] for m in methods)], rows)
    lines += ["", "Trainable parameters, options and fitting time (summed over the targets).", ""]
    first_family = next(iter(results["families"].values()))["methods"]
    rows = [
        [
            METHOD_LABELS[method],
            f"{first_family[method]['trainable_parameters']:,}",
            ", ".join(f"{k}={v}" for k, v in results["methods"][method]["options"].items()) or "-",
            f"{sum(f['methods'][method]['seconds'] for f in results['families'].values()):.1f} s",
        ]
        for method in methods
    ]
    lines += _table(["method", "trainable parameters", "options", "time"], rows)
    return "\n".join(lines) + "\n"


def plot_results(results: dict[str, Any], path: Path) -> None:
    """Grouped bars per family: Frobenius and nuclear error of each method, as % of LoRA's when it ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(results["families"])
    methods = list(results["methods"])
    relative = REFERENCE_METHOD in methods
    metrics = (("relative_frobenius_error", "Frobenius error"), ("nuclear_error", "nuclear error"))
    figure, axes = plt.subplots(2, 1, figsize=(max(8.0, 1.6 * len(families) + 2), 8.5), sharex=True)
    width = 0.84 / len(methods)
    for axis, (metric, title) in zip(axes, metrics, strict=True):
        for index, method in enumerate(methods):
            values = [
                (_relative_to_reference(results, f, method, metric) or 0.0)
                if relative
                else results["families"][f]["methods"][method][metric]
                for f in families
            ]
            offset = (index - (len(methods) - 1) / 2) * width
            bars = axis.bar(
                [p + offset for p in range(len(families))], values, width, label=METHOD_LABELS[method]
            )
            axis.bar_label(bars, fmt="%.0f" if relative else "%.3g", fontsize=6, rotation=90, padding=2)
        if relative:
            axis.axhline(100, color="gray", linestyle="--", linewidth=1)
        axis.set_ylabel(f"% of LoRA's {title}" if relative else title)
        axis.set_title(f"{title.capitalize()} (lower is better)")
        axis.margins(y=0.15)
        axis.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(families)), families, rotation=15, ha="right")
    figure.legend(
        *axes[0].get_legend_handles_labels(),
        loc="lower center",
        ncol=min(len(methods), 8),
        fontsize=8,
        frameon=False,
    )
    settings = results["settings"]
    figure.suptitle(
        f"Matrix approximation at {settings['d_out']}x{settings['d_in']}, "
        f"~{results['budget']:,} trainable parameters, {settings['steps']} AdamW steps"
    )
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path, dpi=150)
    plt.close(figure)


def write_outputs(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``matrix_approx.json``, ``matrix_approx.md`` and ``matrix_approx.png`` to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"matrix_approx.{kind}" for kind in ("json", "md", "png")}
    write_json_atomic(paths["json"], results)
    paths["md"].write_text(results_markdown(results))
    plot_results(results, paths["png"])
    return paths
