"""What the numbers say, written from the numbers: for each mode, where KRAdapter stands against zero-shot
and the other methods in and out of distribution; where the rate choice ended; and what the frontiers
read at shares of each method's ID gain. Sentences compare, they do not judge: the same code writes them
whichever way the numbers go."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kr_vlm.benchmarks.mini.protocol import METHODS_BY_KEY

FOCUS = "kradapter"
REFERENCE = "lora"
ZERO_SHOT = "zero_shot"
OOD_COLUMNS = ("shifted avg", "glyphs", "new", "HM")
PROTOCOL_NAMES = {
    "distribution_shift": "shifted digits",
    "cross_dataset": "glyphs",
    "base_to_new": "new digits (base-to-new)",
}


def _label(key: str) -> str:
    return METHODS_BY_KEY[key].label


def _ranked(numbers: Mapping[str, Mapping[str, float]], column: str) -> list[tuple[str, float]]:
    """The trained methods that have `column`, best first."""
    found = [
        (key, values[column]) for key, values in numbers.items() if key != ZERO_SHOT and column in values
    ]
    return sorted(found, key=lambda item: -item[1])


def mode_findings(title: str, numbers: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Sentences about one mode's 16-shot means ({method key: {summary column: mean}})."""
    zero = numbers.get(ZERO_SHOT, {})
    lines = []
    ranked_id = _ranked(numbers, "digits (ID)")
    if not ranked_id:
        return [f"{title}: no trained method finished."]
    best, best_id = ranked_id[0]
    parts = [f"ID (digits): best {_label(best)} {best_id:.1f}"]
    if FOCUS in numbers and "digits (ID)" in numbers[FOCUS]:
        rank = [key for key, _ in ranked_id].index(FOCUS) + 1
        parts.append(f"KRAdapter {numbers[FOCUS]['digits (ID)']:.1f} ({_ordinal(rank)} of {len(ranked_id)})")
    if "digits (ID)" in zero:
        parts.append(f"zero-shot {zero['digits (ID)']:.1f}")
    lines.append(f"{title}: " + "; ".join(parts) + ".")
    for column in OOD_COLUMNS:
        ranked = _ranked(numbers, column)
        if not ranked:
            continue
        parts = []
        if FOCUS in numbers and column in numbers[FOCUS]:
            mine = numbers[FOCUS][column]
            rank = [key for key, _ in ranked].index(FOCUS) + 1
            text = f"KRAdapter {mine:.1f} ({_ordinal(rank)} of {len(ranked)})"
            if column in zero:
                text += f", {mine - zero[column]:+.1f} against zero-shot's {zero[column]:.1f}"
            parts.append(text)
        if REFERENCE in numbers and column in numbers[REFERENCE]:
            parts.append(f"LoRA {numbers[REFERENCE][column]:.1f}")
        parts.append(f"best {_label(ranked[0][0])} {ranked[0][1]:.1f}")
        if column in zero:
            below = [_label(key) for key, value in ranked if value < zero[column]]
            parts.append("below zero-shot: " + (", ".join(below) if below else "none"))
        lines.append(f"- {column}: " + "; ".join(parts) + ".")
    return lines


def _ordinal(rank: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(rank, f"{rank}th")


def selection_findings(selection: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Where each method's chosen rate ended among the rates tried."""
    inside = [
        _label(key)
        for key, entry in selection.items()
        if entry["chosen"] is not None and entry["edge"] is None
    ]
    widened = [_label(key) for key, entry in selection.items() if entry["widenings"]]
    edge = [
        f"{_label(key)} ({entry['chosen']:g}, {entry['edge']} edge)"
        for key, entry in selection.items()
        if entry["chosen"] is not None and entry["edge"] is not None
    ]
    none = [_label(key) for key, entry in selection.items() if entry["chosen"] is None]
    lines = [
        "Rate choice: inside the rates tried for "
        + (", ".join(inside) or "no method")
        + "; the grid was widened for "
        + (", ".join(widened) or "no method")
        + "; still at an edge when the widening limit was reached: "
        + (", ".join(edge) or "none")
        + "."
    ]
    if none:
        lines.append("No rate finished on every seed for " + ", ".join(none) + ".")
    if FOCUS in selection and selection[FOCUS]["chosen"] is not None:
        entry = selection[FOCUS]
        means = entry["mean_val_top1"]
        shown = ", ".join(
            f"{rate}: {100 * value:.1f}" if value is not None else f"{rate}: diverged"
            for rate, value in means.items()
        )
        lines.append(f"KRAdapter's mean validation top-1 by rate: {shown}; chosen {entry['chosen']:g}.")
    return lines


def frontier_findings(readings: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[str]:
    """For each protocol ({protocol: {method key: frontier table readings}}), KRAdapter's and LoRA's OOD
    top-1 where their ID first reaches zero-shot + 50 % of their best gain, and at their best ID."""
    lines = []
    for protocol, by_method in readings.items():
        parts = []
        for key in (FOCUS, REFERENCE):
            values = by_method.get(key)
            if not values:
                continue
            half, full = values.get("OOD at +50 %"), values.get("OOD at +100 %")
            text = f"{_label(key)} best ID {values['best ID']:.1f}"
            if half is not None and full is not None:
                text += f", OOD {half:.1f} at half its ID gain and {full:.1f} at its best ID"
            parts.append(text)
        if parts:
            lines.append(f"- Frontier, {PROTOCOL_NAMES.get(protocol, protocol)}: " + "; ".join(parts) + ".")
    return lines


def findings(
    summaries: Sequence[tuple[str, Mapping[str, Mapping[str, float]]]],
    selection: Mapping[str, Mapping[str, Any]],
    readings: Mapping[str, Mapping[str, Mapping[str, float]]],
) -> list[str]:
    """Every finding, as Markdown lines."""
    lines: list[str] = []
    for title, numbers in summaries:
        lines += [*mode_findings(title, numbers), ""]
    lines += [*selection_findings(selection), ""]
    frontier = frontier_findings(readings)
    if frontier:
        lines += [
            "Along the frontiers of CLIP-LoRA's recipe (every rate and α; the configuration that reaches the "
            "best ID; zero-shot the origin):",
            *frontier,
            "",
        ]
    return lines
