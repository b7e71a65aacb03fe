"""Turn a sweep folder into the papers' results table.

Every kr_vlm run writes ``metrics.json`` in its run folder. This script finds them all under a
sweep folder (``python train.py -m ...`` writes ``logs/train/multiruns/<time>/<job>/``), groups runs by
(method, shots) and test set, and prints mean +/- std over seeds of the top-1 accuracy, with an
``Average`` column over the test sets, as Markdown (stdout and ``results.md``) and CSV
(``results.csv``) in the sweep folder.

    python scripts/aggregate_results.py logs/train/multiruns/2026-11-28_12-00-00
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def load_runs(sweep_dir: Path) -> list[dict]:
    """Every ``metrics.json`` below ``sweep_dir``, parsed."""
    runs = []
    for path in sorted(sweep_dir.rglob("metrics.json")):
        with path.open() as handle:
            run = json.load(handle)
        run["_path"] = str(path)
        runs.append(run)
    return runs


def collect(runs: list[dict], metric: str = "top1") -> tuple[dict, list[str]]:
    """{(method, shots): {test_set: [accuracy per seed]}} and the ordered test-set names."""
    table: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    test_sets: list[str] = []
    for run in runs:
        row = (run["method"], int(run["shots"]))
        for test_set, values in run["test"].items():
            if metric not in values:
                raise KeyError(f"{run['_path']}: test set {test_set!r} has no {metric!r} metric")
            table[row][test_set].append(100.0 * values[metric])
            if test_set not in test_sets:
                test_sets.append(test_set)
    return table, test_sets


def summarize(table: dict, test_sets: list[str]) -> list[dict]:
    """One record per (method, shots): mean, std and count per test set, and the average of means."""
    records = []
    for method, shots in sorted(table):
        cells = table[(method, shots)]
        stats = {}
        for test_set in test_sets:
            values = cells.get(test_set)
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                stats[test_set] = (statistics.fmean(values), std, len(values))
        # The average is only meaningful when the row covers every test set.
        complete = len(stats) == len(test_sets)
        average = statistics.fmean(mean for mean, _, _ in stats.values()) if complete else None
        records.append({"method": method, "shots": shots, "stats": stats, "average": average})
    return records


def to_markdown(records: list[dict], test_sets: list[str]) -> str:
    header = ["method", "shots", *test_sets, "Average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for record in records:
        cells = [record["method"], str(record["shots"])]
        for test_set in test_sets:
            stat = record["stats"].get(test_set)
            cells.append(f"{stat[0]:.1f} ± {stat[1]:.1f}" if stat else "–")
        cells.append(f"{record['average']:.1f}" if record["average"] is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(records: list[dict], path: Path) -> None:
    """Long format, one line per (method, shots, test set), numbers unformatted."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "shots", "test_set", "mean", "std", "seeds"])
        for record in records:
            for test_set, (mean, std, count) in record["stats"].items():
                writer.writerow(
                    [record["method"], record["shots"], test_set, f"{mean:.4f}", f"{std:.4f}", count]
                )
            if record["average"] is not None:
                writer.writerow(
                    [record["method"], record["shots"], "Average", f"{record['average']:.4f}", "", ""]
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="folder holding the runs' metrics.json files")
    parser.add_argument("--metric", default="top1", choices=["top1", "top5"])
    args = parser.parse_args(argv)

    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a folder")
    runs = load_runs(args.sweep_dir)
    if not runs:
        parser.error(f"no metrics.json below {args.sweep_dir}: is it the folder of a finished sweep?")

    table, test_sets = collect(runs, args.metric)
    records = summarize(table, test_sets)
    markdown = to_markdown(records, test_sets)
    (args.sweep_dir / "results.md").write_text(markdown)
    write_csv(records, args.sweep_dir / "results.csv")
    sys.stdout.write(markdown)
    print(f"\n{len(runs)} runs; wrote {args.sweep_dir / 'results.md'} and {args.sweep_dir / 'results.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
