"""Published zero-shot accuracies beside kr_vlm's zero-shot runs: open_clip's table and aTLAS's.

Two tables ship in `kr_vlm/results/published_tables/`, each with where it comes from:

- `openclip_classification_results.csv`: open_clip's zero-shot top-1 of every pretrained model on the
  classification sets of LAION's CLIP_benchmark (sidecar: `openclip_classification_results.about.json`);
- `atlas_zeroshot_accuracies.json`: aTLAS's zero-shot top-1 of OpenAI's CLIP RN50, RN101, ViT-B-32,
  ViT-B-16 and ViT-L-14 on its 22 datasets.

A published number is put beside one of ours only where the model (open_clip name and pretrained tag)
and the test images are the same: `OPENCLIP_COLUMNS` and `kr_vlm.atlas_names.ATLAS_NAMES` say, for each
published column, which of kr_vlm's datasets test on the same images (a CoOp dataset whose test split is
another one is not listed). Class names and templates can still differ: the row label of each of our
rows says which it used (`data.eval_templates`, `data.classnames`), so that the Δ is read for what it is.
This module reads JSON and CSV only (no torch).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from kr_vlm.atlas_names import ATLAS_NAMES
from kr_vlm.results.runs import EVALUATION_KEYS, Measurements
from kr_vlm.results.tables import Table

TABLES = "published_tables"
OPENCLIP_FILE = "openclip_classification_results.csv"
ATLAS_FILE = "atlas_zeroshot_accuracies.json"
CB = "clip_benchmark/"

# open_clip's column -> kr_vlm's datasets that test on the same images: its registry datasets, and
# CLIP_benchmark's own copies (`data=clip_benchmark`: the torchvision-style set and the webdataset open_clip
# evaluated on, benchmark/webdatasets.txt of LAION-AI/CLIP_benchmark).
OPENCLIP_COLUMNS: dict[str, tuple[str, ...]] = {
    "ImageNet 1k": ("imagenet", "imagenet_atlas", f"{CB}imagenet1k", f"{CB}wds/imagenet1k"),
    "ImageNet v2": ("imagenet_v2", f"{CB}imagenetv2", f"{CB}wds/imagenetv2"),
    "ImageNet Sketch": ("imagenet_sketch", f"{CB}imagenet_sketch", f"{CB}wds/imagenet_sketch"),
    "ImageNet-A": ("imagenet_a", f"{CB}imagenet-a", f"{CB}wds/imagenet-a"),
    "ImageNet-R": ("imagenet_r", f"{CB}imagenet-r", f"{CB}wds/imagenet-r"),
    "CIFAR-10": ("cifar10", f"{CB}cifar10", f"{CB}wds/vtab/cifar10"),
    "CIFAR-100": ("cifar100", f"{CB}cifar100", f"{CB}wds/vtab/cifar100"),
    "MNIST": ("mnist", f"{CB}mnist", f"{CB}wds/mnist"),
    "SVHN": ("svhn", f"{CB}wds/vtab/svhn"),
    "STL-10": ("stl10", f"{CB}stl10", f"{CB}wds/stl10"),
    "GTSRB": ("gtsrb", f"{CB}gtsrb", f"{CB}wds/gtsrb"),
    "Country211": ("country211", f"{CB}country211", f"{CB}wds/country211"),
    "RESISC45": ("resisc45", f"{CB}wds/vtab/resisc45"),  # VTAB's split lists are aTLAS's
    "Pascal VOC 2007": ("pascal_voc", f"{CB}voc2007", f"{CB}wds/voc2007"),
    "Stanford Cars": ("stanford_cars", "stanford_cars_atlas", f"{CB}cars", f"{CB}wds/cars"),
    "FGVC Aircraft": ("fgvc_aircraft", "fgvc_aircraft_atlas", f"{CB}fgvc_aircraft", f"{CB}wds/fgvc_aircraft"),
    "Oxford-IIIT Pet": ("oxford_pets", "oxford_pets_atlas", f"{CB}pets", f"{CB}wds/vtab/pets"),
    "Oxford Flowers-102": ("oxford_flowers_atlas", f"{CB}flowers", f"{CB}wds/vtab/flowers"),
    "Food-101": ("food101_atlas", f"{CB}food101", f"{CB}wds/food101"),
    "Describable Textures": ("dtd_atlas", f"{CB}dtd", f"{CB}wds/vtab/dtd"),  # DTD's test partition 1
    "SUN397": (f"{CB}sun397", f"{CB}wds/sun397"),
    "EuroSAT": (f"{CB}wds/vtab/eurosat",),
    "Caltech-101": (f"{CB}wds/vtab/caltech101",),
    "ObjectNet": (f"{CB}objectnet", f"{CB}wds/objectnet"),
    "ImageNet-O": (f"{CB}imagenet-o", f"{CB}wds/imagenet-o"),
    "Rendered SST2": (f"{CB}renderedsst2", f"{CB}wds/renderedsst2"),
    "PatchCamelyon": (f"{CB}wds/vtab/pcam",),
    "CLEVR Counts": (f"{CB}wds/vtab/clevr_count_all",),
    "CLEVR Distance": (f"{CB}wds/vtab/clevr_closest_object_distance",),
    "KITTI Vehicle Distance": (f"{CB}wds/vtab/kitti_closest_vehicle_distance",),
}


@dataclass(frozen=True)
class PublishedZeroShot:
    """One published row: a model's zero-shot top-1 % per kr_vlm dataset, and where it is from."""

    source: str  # the table's name, e.g. "open_clip"
    model: str
    pretrained: str
    top1: dict[str, float]
    reference: str  # where the numbers come from (file, commit, how they were measured)


def _package_text(filename: str) -> str:
    return resources.files("kr_vlm.results").joinpath(TABLES, filename).read_text(encoding="utf-8")


def load_openclip_table() -> list[PublishedZeroShot]:
    """open_clip's rows, each column spread over the kr_vlm datasets that test on its images."""
    about = json.loads(_package_text(OPENCLIP_FILE.replace(".csv", ".about.json")))
    reference = f"open_clip's docs/{OPENCLIP_FILE} ({about['source']}), measured with CLIP_benchmark"
    rows = []
    for record in csv.DictReader(io.StringIO(_package_text(OPENCLIP_FILE))):
        top1 = {
            dataset: 100.0 * float(record[column])
            for column, datasets in OPENCLIP_COLUMNS.items()
            if record.get(column) not in (None, "")
            for dataset in datasets
        }
        rows.append(PublishedZeroShot("open_clip", record["name"], record["pretrained"], top1, reference))
    return rows


def load_atlas_table() -> list[PublishedZeroShot]:
    """aTLAS's rows: its test-split accuracies (not `<Name>Val`) on kr_vlm's aTLAS datasets."""
    table = json.loads(_package_text(ATLAS_FILE))
    ours = {atlas_name: name for name, atlas_name in ATLAS_NAMES.items()}
    reference = f"aTLAS's checkpoints/<model>/zeroshot_accuracies.json ({table['source']})"
    return [
        PublishedZeroShot(
            "aTLAS",
            model,
            table["pretrained"],
            {ours[key]: 100.0 * value for key, value in accuracies.items() if key in ours},
            reference,
        )
        for model, accuracies in table["models"].items()
    ]


def load_published() -> list[PublishedZeroShot]:
    """Every shipped published zero-shot row."""
    return load_openclip_table() + load_atlas_table()


def _architecture(name: str) -> str:
    # OpenAI's weights are one model under both names: open_clip lists ViT-B-32 and ViT-B-32-quickgelu.
    return name.removesuffix("-quickgelu")


def same_model(ours: tuple[Any, Any], theirs: PublishedZeroShot) -> bool:
    """Whether our (open_clip name, pretrained tag) is the published row's model."""
    name, tag = ours
    return str(tag) == theirs.pretrained and _architecture(str(name)) == _architecture(theirs.model)


def zero_shot_tables(
    measurements: Measurements, published: Sequence[PublishedZeroShot] | None = None
) -> list[Table]:
    """One table a model of our zero-shot runs (shots 0, no adapter) that a published row matches: our
    top-1 per dataset (mean over runs), each matching published row, and Δ = ours − published."""
    published = load_published() if published is None else published
    ours: dict[tuple[Any, Any], dict[Any, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(dict))
    for trained, sets in measurements.values.items():
        if trained.shots != 0 or trained.method != "none":
            continue
        settings = dict(trained.settings)
        model = (settings.get("model.clip.name"), settings.get("model.clip.pretrained"))
        for test_set, (_, top1) in sets.items():
            ours[model][trained.row].setdefault(test_set, []).append(top1)
    tables = []
    for model in sorted(ours, key=str):
        matching = _matching(model, published)
        columns = sorted({column for row in ours[model].values() for column in row})
        columns = [column for column in columns if any(column in row.top1 for row in matching)]
        if not columns:
            continue
        tables.append(_comparison_table(model, ours[model], matching, columns))
    return tables


def _matching(model: tuple[Any, Any], published: Sequence[PublishedZeroShot]) -> list[PublishedZeroShot]:
    """The published rows of our model, one a source: the row of its own name where there is one (open_clip
    lists OpenAI's ViT-B-32 under two names)."""
    rows = [row for row in published if same_model(model, row)]
    exact = {row.source for row in rows if row.model == model[0]}
    return [row for row in rows if row.source not in exact or row.model == model[0]]


def _label(row: tuple[Any, ...], rows: Mapping[Any, Any]) -> str:
    """Our row's label: the evaluation settings (templates, class names) in which our rows of this model differ."""
    differing = sorted(key for key in EVALUATION_KEYS if len({dict(other[2]).get(key) for other in rows}) > 1)
    settings = dict(row[2])
    parts = [f"{key.removeprefix('data.')}={settings.get(key) or 'default'}" for key in differing]
    return "zero-shot" + (f" ({', '.join(parts)})" if parts else "")


def _comparison_table(
    model: tuple[Any, Any],
    rows: Mapping[Any, Mapping[str, list[float]]],
    published: Sequence[PublishedZeroShot],
    columns: list[str],
) -> Table:
    name, tag = model
    table = Table(
        "zero_shot",
        f"Zero-shot {name} ({tag}): top-1 % of our runs beside the published ones (Δ = ours − published)",
        ["row", *columns],
    )
    means = {
        row: {column: statistics.fmean(values) for column, values in cells.items()}
        for row, cells in rows.items()
    }
    labels = {row: _label(row, rows) for row in rows}
    for row in sorted(rows, key=labels.get):
        table.rows.append([labels[row], *_cells(means[row], columns)])
        for column in columns:
            if column in means[row]:
                table.record(f"{name} ({tag})", labels[row], 0, column, means[row][column], None)
    for reference in published:
        table.rows.append([f"{reference.source} (published)", *_cells(reference.top1, columns)])
        for row in sorted(rows, key=labels.get):
            differences = {
                column: means[row][column] - reference.top1[column]
                for column in columns
                if column in means[row] and column in reference.top1
            }
            cells = [f"{differences[column]:+.1f}" if column in differences else "–" for column in columns]
            table.rows.append([f"Δ {labels[row]} − {reference.source}", *cells])
        table.notes.append(
            f"{reference.source} (published, {reference.model} {reference.pretrained}): {reference.reference}."
        )
    table.notes.append(
        "Published and ours share the test images; class names and templates are those each row names "
        "(ours: data.eval_templates, data.classnames of the runs; open_clip: CLIP_benchmark's; aTLAS: aTLAS's)."
    )
    return table


def _cells(values: Mapping[str, float], columns: Sequence[str]) -> list[str]:
    return [f"{values[column]:.1f}" if column in values else "–" for column in columns]
