"""The effective-rank pages: a run's ``rank_report.html`` and the figures and HTML pieces that the cross-run
dashboard (``kr_vlm.dashboard``) shares with it.

Everything here works on plain data, the content of ``rank_history.json`` as ``EffectiveRankMonitor``
writes it, so that reading finished runs needs no training code: matplotlib's Agg canvas (no pyplot
state) draws PNGs, and the pages are self-contained HTML without JavaScript. The few functions that read
a layer's entry of the history (``layer_group``, ``rank_cap``, ``relative_update``) are the one place
that knows its fields.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from kr_vlm.files import write_text_atomic

#: What the rank monitor writes into a run folder (the dashboard reads the history).
HISTORY_FILE = "rank_history.json"
REPORT_FILE = "rank_report.html"

# Log-scale plots need a floor: relative singular values below float32 round-off are noise anyway.
RELATIVE_FLOOR = 1e-8
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")

# Axis labels in matplotlib's mathtext, HTML for table headers.
SIGMA_RATIO_LABEL = r"$\sigma_i \,/\, \sigma_1$"
DELTA_NORM_LABEL = r"$\|\Delta W\|_F$"
RELATIVE_UPDATE_LABEL = r"$\|\Delta W\|_F \,/\, \|W_0\|_F$"
DELTA_NORM_HTML = "‖ΔW‖<sub>F</sub>"
RELATIVE_UPDATE_HTML = "‖ΔW‖<sub>F</sub> / ‖W<sub>0</sub>‖<sub>F</sub>"

EFFECTIVE_RANK_EXPLANATION = (
    "The <b>effective rank</b> of a weight update ΔW (Roy &amp; Vetterli, 2007) is exp(H(p)), where H is the "
    "Shannon entropy of the normalised singular values p<sub>i</sub> = σ<sub>i</sub> / Σ<sub>j</sub> "
    "σ<sub>j</sub>. It equals r when the update spreads its energy evenly over r directions and falls toward "
    "1 when one direction dominates. It can never exceed the update's <b>rank cap</b>, the highest rank the "
    "method can build: r for LoRA and VeRA, r² for LoHa, min(d<sub>out</sub>, d<sub>in</sub>) for KRAdapter, "
    "whose Khatri&ndash;Rao updates are generically full rank with a parameter budget like LoRA's, and for "
    "full fine-tuning, DoRA and RandLoRA. The <b>stable rank</b> ‖ΔW‖<sub>F</sub><sup>2</sup> / "
    "σ<sub>1</sub><sup>2</sup> is a more conservative count dominated by the largest singular values; the "
    f"<b>Frobenius norm</b> {DELTA_NORM_HTML} says how far the update has moved the weights, and "
    f"{RELATIVE_UPDATE_HTML} how far relative to the pretrained weight W<sub>0</sub>. A zero update (as at the "
    "start of training) has rank 0."
)

PAGE_STYLE = """
body { font-family: sans-serif; max-width: 72em; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; }
.note { color: #555; font-size: 0.9em; }
"""


# ------------------------------------------------------------------------------ reading the history
def layer_group(info: dict[str, Any]) -> str:
    """The group a layer is reported in (``"vision/q"``), from its entry in ``rank_history.json``."""
    return info["group"]


def rank_cap(info: dict[str, Any]) -> int:
    """The highest rank the layer's update can reach (histories written before caps were recorded: the
    layer's ``min(d_out, d_in)``)."""
    return int(info.get("rank_cap") or info["max_rank"])


def relative_update(info: dict[str, Any]) -> list[float | None]:
    """``‖ΔW‖_F / ‖W0‖_F`` at every evaluation (None where unknown: no ``base_norm`` recorded, a zero ``W0``)."""
    base = info.get("base_norm")
    return [None if norm is None or not base else norm / base for norm in info["frobenius_norm"]]


def layers_by_group(layers: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Layer names gathered by group, groups and layers in the order they come in the model."""
    groups: dict[str, list[str]] = {}
    for name, info in layers.items():
        groups.setdefault(layer_group(info), []).append(name)
    return groups


def mean(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None (None if there are none)."""
    known = [value for value in values if value is not None]
    return sum(known) / len(known) if known else None


def normalised_mean_spectrum(sigmas: Iterable[Sequence[float]]) -> list[float] | None:
    """``σ_i / σ_1`` averaged over the given spectra (cut to the shortest), floored for log plots; None if
    every update is zero."""
    nonzero = [np.asarray(sigma, dtype=float) for sigma in sigmas]
    nonzero = [sigma / sigma[0] for sigma in nonzero if sigma.size and sigma[0] > 0]
    if not nonzero:
        return None
    length = min(sigma.size for sigma in nonzero)
    return np.maximum(np.mean([sigma[:length] for sigma in nonzero], axis=0), RELATIVE_FLOOR).tolist()


# ------------------------------------------------------------------------------------------- figures
def group_styles(groups: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One colour per layer type and one line style per tower (``"<tower>/<layer type>"``), in order."""
    towers = list(dict.fromkeys(group.split("/")[0] for group in groups))
    layer_types = list(dict.fromkeys(group.split("/")[-1] for group in groups))
    return {
        group: {
            "color": f"C{layer_types.index(group.split('/')[-1]) % 10}",
            "linestyle": LINESTYLES[towers.index(group.split("/")[0]) % len(LINESTYLES)],
        }
        for group in groups
    }


def method_styles(methods: Sequence[str]) -> list[dict[str, Any]]:
    """A style for each plotted series, given the method of each: a colour per method, and a line style and
    marker per series within its method, in order."""
    colours = list(dict.fromkeys(methods))
    seen: dict[str, int] = {}
    styles = []
    for method in methods:
        index = seen.get(method, 0)
        seen[method] = index + 1
        styles.append(
            {
                "color": f"C{colours.index(method) % 10}",
                "linestyle": LINESTYLES[index % len(LINESTYLES)],
                "marker": MARKERS[index % len(MARKERS)],
            }
        )
    return styles


def new_axes() -> tuple[Figure, Any]:
    """One plot of the reports' size."""
    # A fixed layout: matplotlib's constrained/tight layouts double the drawing time.
    figure = Figure(figsize=(7.5, 4.5))
    figure.subplots_adjust(left=0.11, right=0.97, bottom=0.12, top=0.92)
    return figure, figure.add_subplot()


def panel_grid(count: int, title: str, columns: int = 3) -> tuple[Figure, list[Any]]:
    """``count`` small plots in rows of ``columns`` under one title (unused cells hidden)."""
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(4.3 * columns, 3.0 * rows + 0.6))
    top = 1 - 0.6 / (3.0 * rows + 0.6)
    figure.subplots_adjust(
        left=0.07, right=0.98, bottom=0.25 / rows, top=top - 0.05 / rows, hspace=0.55, wspace=0.3
    )
    figure.suptitle(title)
    grid = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for axes in grid[count:]:
        axes.set_visible(False)
    return figure, grid[:count]


def rank_axis(axes: Any) -> None:
    """A y axis for effective ranks of several methods at once: linear from 0 to 1, logarithmic above (a
    symmetric log scale), so that LoRA's rank 2 and KRAdapter's rank 100 are both read off one plot and a
    zero update (rank 0, at the start of training) stays on it. Ticks are plain numbers."""
    from matplotlib.ticker import FuncFormatter

    axes.set_yscale("symlog", linthresh=1, linscale=0.5)
    axes.set_ylim(bottom=0)
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def spectra_figure(spectra_by_group: dict[str, Sequence[Sequence[float]]], step: int | None) -> Figure:
    """Singular values divided by the largest, averaged over each group's layers, on a log scale."""
    figure, axes = new_axes()
    styles = group_styles(list(spectra_by_group))
    plotted = False
    for group, sigmas in spectra_by_group.items():
        spectrum = normalised_mean_spectrum(sigmas)
        if spectrum is None:
            continue
        axes.plot(range(1, len(spectrum) + 1), spectrum, label=f"{group} ({len(sigmas)})", **styles[group])
        plotted = True
    axes.set_yscale("log")
    axes.set_xlabel("index $i$")
    axes.set_ylabel(f"{SIGMA_RATIO_LABEL}, mean over the group's layers")
    axes.set_title(f"Singular values of the weight updates, step {step}")
    if plotted:
        axes.legend(fontsize="small", ncols=2)
    else:
        axes.text(0.5, 0.5, "all updates are zero", transform=axes.transAxes, ha="center")
    return figure


def history_figure(history: dict[str, Any]) -> Figure:
    """The effective rank of each group (mean over its layers) against the training step."""
    figure, axes = new_axes()
    steps = history["steps"]
    marker = "o" if len(steps) < 30 else None
    groups = list(layers_by_group(history["layers"]))
    styles = group_styles(groups)
    for group in groups:
        series = history["groups"][group]["effective_rank"]
        axes.plot(steps, series, marker=marker, markersize=3, label=group, **styles[group])
    rank_axis(axes)
    axes.set_xlabel("step")
    axes.set_ylabel("effective rank (log above 1), mean of the group")
    axes.set_title("Effective rank of the weight updates during training")
    if groups:
        axes.legend(fontsize="small", ncols=2)
    return figure


def layer_history_figure(history: dict[str, Any]) -> Figure:
    """One plot a group, one line a layer (darker: earlier in the model), its effective rank against
    the step, with the group's rank cap as a dashed line."""
    steps, layers = history["steps"], history["layers"]
    groups = layers_by_group(layers)
    figure, panels = panel_grid(
        max(1, len(groups)),
        "Effective rank of every layer's update (darker: earlier block; dashed: rank cap)",
    )
    for axes, (group, names) in zip(panels, groups.items(), strict=False):
        colours = figure_colours(len(names))
        for colour, name in zip(colours, names, strict=True):
            values = [np.nan if value is None else value for value in layers[name]["effective_rank"]]
            axes.plot(steps, values, color=colour, linewidth=1)
        cap = max(rank_cap(layers[name]) for name in names)
        axes.axhline(cap, color="0.4", linestyle="--", linewidth=1)
        axes.set_ylim(0, cap * 1.08)
        axes.set_title(f"{group} ({len(names)} layers, cap {cap})", fontsize="medium")
        axes.set_xlabel("step", fontsize="small")
        axes.set_ylabel("effective rank", fontsize="small")
    return figure


def figure_colours(count: int) -> list[Any]:
    """``count`` colours from dark to light (viridis), one for each layer of a group in model order."""
    from matplotlib import colormaps

    return [colormaps["viridis"](0.85 * index / max(1, count - 1)) for index in range(count)]


# ------------------------------------------------------------------------------------------------ HTML
def image_tag(png_bytes: bytes, alt: str) -> str:
    encoded = base64.b64encode(png_bytes).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A table; header cells are HTML written by kr_vlm (``‖ΔW‖<sub>F</sub>``), body cells are escaped."""
    head = "".join(f"<th>{cell}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_page(title: str, body: str) -> str:
    """A whole self-contained page: inline style, no script, nothing fetched."""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
        f"<style>{PAGE_STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def cap_text(caps: Iterable[int]) -> str:
    """``"2"`` or ``"64–128"``: the rank caps of a set of layers."""
    caps = sorted(set(caps))
    return f"{caps[0]}" if len(caps) == 1 else f"{caps[0]}–{caps[-1]}"


def _last(values: list[float | None]) -> float | None:
    return values[-1] if values else None


def write_html_report(
    path: Path, history: dict[str, Any], spectra_png: bytes, history_png: bytes, finished: bool = True
) -> str:
    """Write one run's report: tables and base64 images, opens anywhere, needs no other file or network.
    ``finished=False``: the page says that training is still running (it is rewritten as the run goes).
    Returns the page."""
    layers = history["layers"]
    group_rows = []
    for group, names in layers_by_group(layers).items():
        members = [layers[name] for name in names]
        shapes = sorted({f"{info['shape'][0]}×{info['shape'][1]}" for info in members})
        series = history["groups"][group]
        group_rows.append(
            [
                group,
                len(members),
                ", ".join(shapes),
                cap_text(rank_cap(info) for info in members),
                fmt(_last(series["effective_rank"])),
                fmt(mean(_percent_of_cap(info) for info in members), 1),
                fmt(_last(series["stable_rank"])),
                fmt(_last(series["frobenius_norm"]), 4),
                fmt(mean(_last(relative_update(info)) for info in members), 4),
            ]
        )
    layer_rows = [
        [
            name,
            layer_group(info),
            f"{info['shape'][0]}×{info['shape'][1]}",
            rank_cap(info),
            fmt(_last(info["effective_rank"])),
            fmt(_last(info["stable_rank"])),
            fmt(_last(info["frobenius_norm"]), 4),
            fmt(_last(relative_update(info)), 4),
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
    group_table = html_table(
        ["group", "layers", "shape", "rank cap", "effective rank", "% of cap", "stable rank"]
        + [DELTA_NORM_HTML, RELATIVE_UPDATE_HTML],
        group_rows,
    )
    layer_table = html_table(
        ["layer", "group", "shape", "rank cap", "effective rank", "stable rank", DELTA_NORM_HTML]
        + [RELATIVE_UPDATE_HTML],
        layer_rows,
    )
    status = (
        f"Training finished at step {history['final_step']}."
        if finished
        else f"Training is still running: this page shows step {history['final_step']} and is rewritten at "
        "every rank evaluation (reload it to follow the run)."
    )
    body = f"""<h1>Effective rank of the weight updates</h1>
<p class="status"><b>{status}</b></p>
<p>Step {history["final_step"]}, {len(history["steps"])} evaluations, {len(layers)} adapted layers;
the latest evaluation took {seconds:.2f} s.</p>
<h2>What effective rank means</h2>
<p>{EFFECTIVE_RANK_EXPLANATION}</p>
<h2>Trainable parameters</h2>
{html_table(["method", "trainable", "total", "trainable %"], parameter_rows)}
<details><summary>per tower and layer type</summary>
{html_table(["group", "trainable", "total"], group_parameter_rows)}
</details>
<h2>Latest ranks per group</h2>
{group_table}
<h2>Effective rank over steps</h2>
{image_tag(history_png, "effective rank over steps per group")}
{image_tag(png(layer_history_figure(history)), "effective rank over steps of every layer, by group")}
<h2>Singular value spectra (latest step)</h2>
{image_tag(spectra_png, "normalised singular values per group")}
<h2>Per layer</h2>
<details><summary>{len(layer_rows)} layers</summary>
{layer_table}
</details>"""
    page = html_page("kr_vlm rank report", body)
    write_text_atomic(path, page)
    return page


def stopped_page(page: str, step: int | None) -> str:
    """A live report's ``page`` saying that training stopped at ``step`` before it finished."""
    status = (
        f"Training stopped at step {step} before it finished (an error, or the run was interrupted); this "
        "page shows its last rank evaluation."
    )
    return re.sub(r'<p class="status">.*?</p>', f'<p class="status"><b>{status}</b></p>', page, count=1)


def _percent_of_cap(info: dict[str, Any]) -> float | None:
    effective = _last(info["effective_rank"])
    return None if effective is None else 100 * effective / rank_cap(info)
