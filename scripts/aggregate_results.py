"""Turn folders of kr_vlm runs into the papers' tables: few-shot, base-to-new, distribution shift, cross-dataset.

Every run writes ``metrics.json`` in its run folder. This script reads every one below the folders
given (a sweep, ``python train.py -m ...``, writes ``logs/<task>/multiruns/<time>/<job>/``), groups
them by what was trained, so that an evaluation of a training run never counts as another seed, and
prints one Markdown table per protocol the runs cover, with mean ± std over seeds and the number of
seeds (the logic: `kr_vlm.results`). Runs on aTLAS's 22 datasets also give the KRAdapter / RandLoRA
papers' table: each dataset and the average over the 22, per budget (`kr_vlm.results.atlas`). With one
folder, the tables also go to ``results.md`` and, as long-format CSV, ``results.csv`` in it.

When runs were tested at several update scales (``adapter_scales``, metrics.json's ``test_by_scale``),
it also prints each method's ID / OOD frontier over α and the learning rate (``kr_vlm.results.frontier``)
and writes, beside ``results.md``: ``frontier.md`` (the frontier tables), ``frontier.png`` (the figure)
and ``frontier_points.csv`` (every point: its α, ID and OOD top-1, run folder and the files it was read
from). The frontier is top-1.

    python scripts/aggregate_results.py logs/clip_kr_fewshot/multiruns/2026-11-28_12-00-00
    python scripts/aggregate_results.py logs/clip_kr_fewshot/multiruns/* --reference
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kr_vlm import metric_names, results
from kr_vlm.errors import command_boundary
from kr_vlm.results import atlas, published
from kr_vlm.run_folder import FAILED_FILE
from kr_vlm.table_text import csv_text

FRONTIER_FILES = ("frontier.md", "frontier.png", "frontier_points.csv")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Tables: few-shot (datasets x shots, Average over datasets); base-to-new (base, new and "
        "their harmonic mean per dataset, and the Average); distribution shift and cross-dataset (the "
        "source, each target and the average over the targets alone), one table per source dataset.",
    )
    parser.add_argument(
        "folders",
        type=Path,
        nargs="+",
        metavar="FOLDER",
        help="folders searched recursively for runs' metrics.json: sweep folders "
        "(logs/<task>/multiruns/<time>), run folders, or logs/ for everything",
    )
    parser.add_argument(
        "--metric",
        default=metric_names.TOP1,
        choices=[metric_names.TOP1, metric_names.TOP5],
        help="the accuracy to tabulate (default: top1; the published rows are top-1)",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="add the published rows beside ours, each with a Δ row: ours − published: CLIP-LoRA's few-shot "
        "results (kr_vlm/results/reference_results.json) and, beside zero-shot runs of the same model and pretrained "
        "tag, open_clip's and aTLAS's zero-shot accuracies (kr_vlm/results/published_tables/, with their sources)",
    )
    parser.add_argument(
        "--reference-file",
        type=Path,
        metavar="JSON",
        help="read the published rows from this file (the shipped file's format) instead; implies --reference",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        metavar="FOLDER",
        help="write results.md and results.csv here (default: the folder, when one is given; with "
        "several, only with this option)",
    )
    return parser


def write_frontier(output_dir: Path, frontier_list: list[results.Frontier], markdown: str) -> None:
    """``frontier.md`` (the tables, the figure linked), ``frontier.png`` and ``frontier_points.csv``."""
    from kr_vlm.rank_report import png
    from kr_vlm.results.frontier_figure import frontier_figure

    (output_dir / "frontier.png").write_bytes(png(frontier_figure(frontier_list)))
    (output_dir / "frontier.md").write_text(f"![{frontier_list[0].panel.name}](frontier.png)\n\n{markdown}")
    (output_dir / "frontier_points.csv").write_text(
        csv_text(results.points_rows(frontier_list), results.POINTS_FIELDS)
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    for folder in args.folders:
        if not folder.is_dir():
            parser.error(f"{folder} is not a folder")
    runs = [run for folder in args.folders for run in results.load_runs(folder)]
    if not runs:
        parser.error(
            f"no metrics.json below {', '.join(map(str, args.folders))}: is it the folder of a finished sweep?"
        )
    if (args.reference or args.reference_file) and args.metric != metric_names.TOP1:
        parser.error("the published rows are top-1 accuracies: use --reference with --metric top1")
    references = results.load_references(args.reference_file) if args.reference or args.reference_file else []

    measurements = results.measure(runs, args.metric)
    tables = results.protocol_tables(measurements, references)
    tables += atlas.atlas22_tables(measurements)
    if args.reference or args.reference_file:
        tables += published.zero_shot_tables(measurements)
    markdown = "\n".join(table.markdown() for table in tables)
    sys.stdout.write(markdown)
    frontier_list = results.frontiers(runs) if any("test_by_scale" in run.metrics for run in runs) else []
    frontier_tables = [results.frontier_table(frontier) for frontier in frontier_list]
    frontier_markdown = "\n".join(table.markdown() for table in frontier_tables)
    if frontier_markdown:
        sys.stdout.write("\n" + frontier_markdown)
    recounted = (
        f" ({measurements.duplicates} repeated results of the same trained model counted once)"
        if measurements.duplicates
        else ""
    )
    summary = f"\n{len(runs)} runs{recounted}."
    failed = [path.parent for folder in args.folders for path in sorted(folder.rglob(FAILED_FILE))]
    if failed:
        summary += f" Left out {len(failed)} runs that did not finish ({FAILED_FILE}): {', '.join(map(str, failed))}."

    output_dir = args.output_dir or (args.folders[0] if len(args.folders) == 1 else None)
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "results.md").write_text(markdown)
        records = [record for table in [*tables, *frontier_tables] for record in table.records]
        (output_dir / "results.csv").write_text(csv_text(records, results.CSV_FIELDS))
        summary += f" Wrote {output_dir / 'results.md'} and {output_dir / 'results.csv'}."
        if frontier_list:
            write_frontier(output_dir, frontier_list, frontier_markdown)
            summary += f" The frontier: {', '.join(str(output_dir / name) for name in FRONTIER_FILES)}."
    print(summary)
    return 0


if __name__ == "__main__":
    with command_boundary():
        sys.exit(main())
