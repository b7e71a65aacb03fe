"""Plots and the self-contained HTML report of ``EffectiveRankMonitor`` (matplotlib Agg, no pyplot state)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

# Log-scale plots need a floor: relative singular values below float32 round-off are noise anyway.
_RELATIVE_FLOOR = 1e-8
_LINESTYLES = ("-", "--", ":", "-.")

EFFECTIVE_RANK_EXPLANATION = (
    "The <b>effective rank</b> of a weight update ΔW (Roy &amp; Vetterli, 2007) is exp(H(p)), where H is the "
    "Shannon entropy of the normalised singular values p<sub>i</sub> = σ<sub>i</sub> / Σ<sub>j</sub> "
    "σ<sub>j</sub>. It equals r when the update spreads its energy evenly over r directions and falls toward "
    "1 when one direction dominates; its ceiling is min(d<sub>out</sub>, d<sub>in</sub>). A LoRA update of "
    "rank r can never exceed r, whereas KRAdapter's Khatri&ndash;Rao updates are generically full rank, so "
    "their effective rank can approach the ceiling with a similar parameter budget. The <b>stable rank</b> "
    "‖ΔW‖<sub>F</sub><sup>2</sup> / σ<sub>1</sub><sup>2</sup> is a more conservative count dominated by the "
    "largest singular values, and the <b>Frobenius norm</b> ‖ΔW‖<sub>F</sub> says how far the update has "
    "moved the weights. A zero update (as at the start of training) has rank 0."
)


def _styles(groups: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One colour per layer type and one line style per tower, in the order the groups come."""
    towers = list(dict.fromkeys(group.split("/")[0] for group in groups))
    layer_types = list(dict.fromkeys(group.split("/")[1] for group in groups))
    return {
        group: {
            "color": f"C{layer_types.index(group.split('/')[1]) % 10}",
            "linestyle": _LINESTYLES[towers.index(group.split("/")[0]) % len(_LINESTYLES)],
        }
        for group in groups
    }


def _new_axes() -> tuple[Figure, Any]:
    # A fixed layout: matplotlib's constrained/tight layouts double the drawing time.
    figure = Figure(figsize=(7.5, 4.5))
    figure.subplots_adjust(left=0.1, right=0.97, bottom=0.11, top=0.92)
    return figure, figure.add_subplot()


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def render_spectra_figure(spectra_by_group: dict[str, Sequence[torch.Tensor]], step: int | None) -> bytes:
    """PNG: singular values divided by the largest, averaged over each group's layers, on a log scale."""
    figure, axes = _new_axes()
    plotted = False
    styles = _styles(list(spectra_by_group))
    for group, sigmas in spectra_by_group.items():
        nonzero = [sigma / sigma[0] for sigma in sigmas if sigma.numel() and sigma[0] > 0]
        if not nonzero:
            continue
        length = min(len(sigma) for sigma in nonzero)
        mean = torch.stack([sigma[:length] for sigma in nonzero]).mean(0).clamp_min(_RELATIVE_FLOOR)
        axes.plot(range(1, length + 1), mean.tolist(), label=f"{group} ({len(nonzero)})", **styles[group])
        plotted = True
    axes.set_yscale("log")
    axes.set_xlabel("index i")
    axes.set_ylabel("σ_i / σ_1, mean over the group's layers")
    axes.set_title(f"Singular values of the weight updates, step {step}")
    if plotted:
        axes.legend(fontsize="small", ncols=2)
    else:
        axes.text(0.5, 0.5, "all updates are zero", transform=axes.transAxes, ha="center")
    return _png(figure)


def render_history_figure(history: dict[str, Any]) -> bytes:
    """PNG: the effective rank of each group (mean over its layers) against the training step."""
    figure, axes = _new_axes()
    steps = history["steps"]
    marker = "o" if len(steps) < 30 else None
    groups = [group for group in history["groups"] if group != "all"]
    styles = _styles(groups)
    for group in groups:
        series = history["groups"][group]["effective_rank"]
        axes.plot(steps, series, marker=marker, markersize=3, label=group, **styles[group])
    axes.set_xlabel("step")
    axes.set_ylabel("effective rank, mean over the group's layers")
    axes.set_title("Effective rank of the weight updates during training")
    if history["groups"]:
        axes.legend(fontsize="small", ncols=2)
    return _png(figure)


def _image_tag(png: bytes, alt: str) -> str:
    return (
        f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _last(values: list[float | None]) -> float | None:
    return values[-1] if values else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def write_html_report(path: Path, history: dict[str, Any], spectra_png: bytes, history_png: bytes) -> None:
    """Write one HTML file with tables and base64 images: opens anywhere, needs no other file or network."""
    layers = history["layers"]
    group_rows = []
    for group in (g for g in history["groups"] if g != "all"):
        members = [info for info in layers.values() if info["group"] == group]
        shapes = sorted({f"{info['shape'][0]}×{info['shape'][1]}" for info in members})
        max_rank = sum(info["max_rank"] for info in members) / len(members)
        series = history["groups"][group]
        effective = _last(series["effective_rank"])
        group_rows.append(
            [
                group,
                len(members),
                ", ".join(shapes),
                f"{max_rank:g}",
                _fmt(effective),
                _fmt(None if effective is None else 100 * effective / max_rank, 1),
                _fmt(_last(series["stable_rank"])),
                _fmt(_last(series["frobenius_norm"]), 4),
            ]
        )
    layer_rows = [
        [
            name,
            info["group"],
            f"{info['shape'][0]}×{info['shape'][1]}",
            _fmt(_last(info["effective_rank"])),
            _fmt(_last(info["stable_rank"])),
            _fmt(_last(info["frobenius_norm"]), 4),
        ]
        for name, info in layers.items()
    ]
    parameters = history.get("parameters") or {}
    methods = ", ".join(parameters.get("methods", [])) or "unknown"
    parameter_rows = (
        [
            [
                methods,
                f"{parameters['trainable']:,}",
                f"{parameters['total']:,}",
                f"{parameters['trainable_percent']:.3f}",
            ]
        ]
        if parameters
        else []
    )
    group_parameter_rows = [
        [group, f"{counts['trainable']:,}", f"{counts['total']:,}"]
        for group, counts in parameters.get("by_group", {}).items()
    ]
    seconds = history["seconds"][-1] if history["seconds"] else 0.0
    document = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>kr_vlm rank report</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>Effective rank of the weight updates</h1>
<p>Step {history["final_step"]}, {len(history["steps"])} evaluations, {len(layers)} adapted layers;
the latest evaluation took {seconds:.2f} s.</p>
<h2>What effective rank means</h2>
<p>{EFFECTIVE_RANK_EXPLANATION}</p>
<h2>Trainable parameters</h2>
{_table(["method", "trainable", "total", "trainable %"], parameter_rows)}
<details><summary>per tower and layer type</summary>
{_table(["group", "trainable", "total"], group_parameter_rows)}
</details>
<h2>Latest ranks per group</h2>
{_table(["group", "layers", "shape", "max rank", "effective rank", "% of max", "stable rank", "‖ΔW‖_F"], group_rows)}
<h2>Effective rank over steps</h2>
{_image_tag(history_png, "effective rank over steps per group")}
<h2>Singular value spectra (latest step)</h2>
{_image_tag(spectra_png, "normalised singular values per group")}
<h2>Per layer</h2>
<details><summary>{len(layer_rows)} layers</summary>
{_table(["layer", "group", "shape", "effective rank", "stable rank", "‖ΔW‖_F"], layer_rows)}
</details>
</body></html>
"""
    path.write_text(document, encoding="utf-8")
