"""Report which datasets (CoOp's layout, aTLAS's 22) are present under a data root, with image counts.

    python scripts/check_data.py /path/to/DATA            # every dataset
    python scripts/check_data.py data --datasets dtd eurosat

Each dataset is `found` (every split reads and every listed image file exists), `missing` (its
folder is absent: normal, few people hold all of them) or `malformed` (the folder is there but a
split file is missing or inconsistent, or listed images do not exist). Exit status: 1 if any
dataset is malformed or the root does not exist, else 0. Images are not decoded; a corrupt file
shows up at training time (see `data.skip_corrupt`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.table import Table

from kr_vlm.console import print_table, stdout_console
from kr_vlm.data.base import DatasetNotFoundError, MalformedDatasetError
from kr_vlm.data.registry import DATASETS, SPLITS, build_dataset
from kr_vlm.errors import command_boundary


def check_dataset(root: Path, name: str) -> tuple[str, dict[str, int], int, str]:
    """Return `(status, images per split, number of classes, note)` for one dataset."""
    info = DATASETS[name]
    if not (root / info.folder).is_dir():
        return "missing", {}, 0, f"expected {root / info.folder}"
    counts: dict[str, int] = {}
    num_classes = 0
    for split in info.splits:
        try:
            dataset = build_dataset(name, root, split)
        except (DatasetNotFoundError, MalformedDatasetError) as err:
            return "malformed", counts, num_classes, str(err)
        absent = dataset.missing_files()
        if absent:
            return (
                "malformed",
                counts,
                num_classes,
                f"{split}: {len(absent)} listed image files missing, e.g. {absent[0]}",
            )
        counts[split] = len(dataset)
        num_classes = len(dataset.classnames)
    return "found", counts, num_classes, ""


def main(argv: list[str] | None = None) -> int:
    """Print the table for the data root given in `argv`; return the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", type=Path, help="the data root ($DATA), e.g. data/")
    on_disk = [name for name, info in DATASETS.items() if info.folder is not None]
    parser.add_argument("--datasets", nargs="+", choices=on_disk, default=on_disk, help="datasets to check")
    args = parser.parse_args(argv)

    console = stdout_console()
    root = args.root.expanduser()
    if not root.is_dir():
        console.print(f"[red]Data root {root} does not exist.[/red] See data/README.md.")
        return 1
    table = Table(title=f"Datasets under {root.resolve()}")
    for column in ("dataset", "folder", "status", "classes", *SPLITS, "note"):
        table.add_column(
            column, justify="right" if column in ("classes", *SPLITS) else "left", overflow="fold"
        )
    colours = {"found": "green", "missing": "yellow", "malformed": "red"}
    malformed = 0
    for name in args.datasets:
        status, counts, num_classes, note = check_dataset(root, name)
        malformed += status == "malformed"
        table.add_row(
            name,
            DATASETS[name].folder,
            f"[{colours[status]}]{status}[/{colours[status]}]",
            str(num_classes or ""),
            *(str(counts[split]) if split in counts else "-" for split in SPLITS),
            note,
        )
    print_table(table, console)
    if "imagenet" in args.datasets and (root / DATASETS["imagenet"].folder).is_dir():
        console.print("imagenet: val is the official val folder, i.e. the same images as test (CoOp).")
    return 1 if malformed else 0


if __name__ == "__main__":
    with command_boundary():
        sys.exit(main())
