"""LAION's CLIP_benchmark (`pip install 'kr_vlm[benchmark]'`, the `clip-benchmark` package) as a data source.

- `benchmark_templates(info)` / `benchmark_classnames(info, names)`: the templates and class names
  CLIP_benchmark evaluates a dataset with (its `en_zeroshot_classification_templates.json` and
  `en_classnames.json`, else the dataset's own names, as its `build_dataset` does), for kr_vlm's datasets
  whose labels are in CLIP_benchmark's order (`DatasetInfo.clip_benchmark_name`).
- Any of its classification datasets as `clip_benchmark/<its name>` (`data=clip_benchmark
  data.name=<its name>`): built by CLIP_benchmark's `build_dataset` from `<dataset_root>`, or, for its
  webdataset copies (`wds/...`), read from their tar shards: a local folder in the layout its
  `build_wds_dataset` reads (`<split>/nshards.txt`, `<split>/<i>.tar`, `classnames.txt`,
  `zeroshot_classification_templates.txt`), else the Hugging Face cache of `clip-benchmark/wds_<name>`.

Nothing is downloaded unless `download` is set (`data.download=true`); `HF_HUB_OFFLINE=1` is honoured
by huggingface_hub. A sample is ``<source>#<index>`` (torchvision-style sets: the index in the
dataset's order) or ``<shard>#<key>`` (webdatasets: the sample's key in its shard), so every few-shot
draw works on them as on image files.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image

from kr_vlm.data.base import DatasetNotFoundError, ImageListDataset, MalformedDatasetError
from kr_vlm.data.datamodules import FewShotDataModule
from kr_vlm.errors import ConfigError

PREFIX = "clip_benchmark/"
INSTALL_HINT = "pip install -e '.[benchmark]' (the clip-benchmark package)"
HUB_REPO = "clip-benchmark/wds_{dataset_cleaned}"
WDS_IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")


def _package_json(filename: str) -> dict[str, Any]:
    try:
        files = resources.files("clip_benchmark.datasets")
    except ModuleNotFoundError:
        raise ConfigError(
            f"CLIP_benchmark's class names and templates need its package: {INSTALL_HINT}."
        ) from None
    return json.loads(files.joinpath(filename).read_text(encoding="utf-8"))


@lru_cache(maxsize=2)
def _table(filename: str) -> dict[str, Any]:
    return _package_json(filename)


def _lookup_keys(name: str) -> list[str]:
    """The keys CLIP_benchmark looks a dataset's templates up under: `vtab/x` and `wds/x` also as `x`."""
    prefix, _, rest = name.partition("/")
    return [name, rest] if prefix in ("vtab", "tfds", "wds") and rest else [name]


def _as_kr_vlm_template(template: str) -> str:
    # CLIP_benchmark writes "a photo of a {c}." and fills it with str.format(c=...); kr_vlm's have "{}".
    return template.replace("{c}", "{}")


def benchmark_templates(info: Any) -> tuple[str, ...]:
    """CLIP_benchmark's templates of the dataset `info` describes (ImageNet's where it has none, as its
    builder falls back)."""
    templates = benchmark_templates_of(info.clip_benchmark_name or "imagenet1k")
    return tuple(_as_kr_vlm_template(template) for template in templates)


def benchmark_classnames(info: Any, names: list[str]) -> list[str]:
    """The class names CLIP_benchmark evaluates `info`'s dataset with: its `en_classnames.json` entry, VOC's
    raw category names, else the dataset's own names (`names`, which its torchvision readers give too)."""
    if info.clip_benchmark_name is None:
        raise ConfigError(
            f"CLIP_benchmark has no class names for {info.name!r} in kr_vlm's label order: "
            "leave data.classnames at default."
        )
    table = _table("en_classnames.json")
    if info.clip_benchmark_name in table:
        theirs = list(table[info.clip_benchmark_name])
    elif info.clip_benchmark_name == "voc2007":
        from clip_benchmark.datasets.voc2007 import object_categories

        theirs = list(object_categories)
    else:
        return names
    if len(theirs) != len(names):
        raise MalformedDatasetError(
            f"{info.name}: CLIP_benchmark names {len(theirs)} classes, the data on disk {len(names)}."
        )
    return theirs


# ------------------------------------------------------------------------------ CLIP_benchmark as a source


class ClipBenchmarkDataModule(FewShotDataModule):
    """`FewShotDataModule` on CLIP_benchmark's dataset `name` (``cifar10``, ``wds/vtab/cifar10``, ...), whose
    kr_vlm name is ``clip_benchmark/<name>``: zero-shot evaluation (`shots=0`) or a few-shot draw from its
    train split, tested on its test split, with its class names and templates (`eval_templates=clip_benchmark`).

    Args:
        name: CLIP_benchmark's dataset name (its `--dataset`).
        dataset: ``clip_benchmark/<name>`` (the configs derive it from `name`); None: the same.
        dataset_root: CLIP_benchmark's `--dataset_root`, with its placeholders `{dataset}` and
            `{dataset_cleaned}` (and `{data_root}`, the data root); None: `<root>/clip_benchmark/<name>`
            (webdatasets: `wds_<name>`, then the Hugging Face cache of `clip-benchmark/wds_<name>`).
        The other arguments are `FewShotDataModule`'s.
    """

    def __init__(self, name: str, dataset: str | None = None, dataset_root: str | None = None, **kwargs: Any):
        expected = f"{PREFIX}{name}"
        if dataset not in (None, expected):
            raise ConfigError(
                f"data.dataset={dataset!r} does not name data.name={name!r}: leave data.dataset out."
            )
        self.dataset_root = dataset_root
        super().__init__(dataset=expected, **kwargs)


@dataclass(frozen=True)
class BenchmarkSource:
    """Where a CLIP_benchmark dataset comes from: its name, its `dataset_root` (CLIP_benchmark's
    `--dataset_root`, placeholders `{dataset}`, `{dataset_cleaned}`, `{data_root}` filled) and whether
    CLIP_benchmark / huggingface_hub may download it."""

    name: str
    dataset_root: str
    download: bool = False

    @property
    def short_name(self) -> str:
        return self.name.removeprefix("wds/")

    @property
    def cleaned(self) -> str:
        return self.short_name.replace("/", "-")

    @property
    def is_webdataset(self) -> bool:
        return self.name.startswith("wds/")


def resolve_root(template: str | None, name: str, data_root: str | Path) -> str:
    """The folder of CLIP_benchmark's dataset `name`: `template` (None: `<data root>/clip_benchmark/<name>`,
    webdatasets `<data root>/clip_benchmark/wds_<name>`, as its README names their folders) with
    CLIP_benchmark's placeholders filled: `{dataset}` is the name without `wds/` (as its CLI),
    `{dataset_cleaned}` that name with `/` as `-`, `{data_root}` the data root."""
    short = name.removeprefix("wds/")
    cleaned = short.replace("/", "-")
    if template is None:
        template = (
            f"{{data_root}}/clip_benchmark/{'wds_' if name.startswith('wds/') else ''}{{dataset_cleaned}}"
        )
    data_root = str(Path(data_root).expanduser().absolute())
    return template.format(dataset=short, dataset_cleaned=cleaned, data_root=data_root)


def build_benchmark_dataset(
    source: BenchmarkSource, split: str, classnames: str = "default", **options: Any
) -> ImageListDataset:
    """Split `split` of a CLIP_benchmark dataset as an `ImageListDataset` (with its `templates`)."""
    if classnames not in ("default", "clip_benchmark"):
        raise ConfigError(f"data.classnames must be default or clip_benchmark, got {classnames!r}.")
    if source.is_webdataset:
        samples, names, templates, images = _read_webdataset(_webdataset_folder(source), split)
    else:
        samples, names, templates, images = _read_torchvision_style(source, split)
    dataset = ImageListDataset(
        samples, names, name=f"{PREFIX}{source.name}/{split}", open_image=images, **options
    )
    dataset.templates = tuple(_as_kr_vlm_template(template) for template in templates) or None
    return dataset


def _missing(source: BenchmarkSource, where: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"CLIP_benchmark's {source.name!r} is not at {where}. Put it there (data.dataset_root names the folder, "
        "CLIP_benchmark's --dataset_root), or set data.download=true to let CLIP_benchmark"
        f"{' / huggingface_hub (' + HUB_REPO.format(dataset_cleaned=source.cleaned) + ')' if source.is_webdataset else ''}"
        " fetch it."
    )


# --------------------------------------------------------------------------------- torchvision-style sets


@lru_cache(maxsize=4)
def _benchmark_dataset(name: str, root: str, split: str, download: bool) -> Any:
    try:
        from clip_benchmark.datasets.builder import build_dataset
    except ModuleNotFoundError:
        raise ConfigError(f"data=clip_benchmark needs CLIP_benchmark: {INSTALL_HINT}.") from None
    try:
        return build_dataset(name, root=root, transform=None, split=split, download=download)
    except (AssertionError, ValueError) as err:  # its checks of names and splits are asserts
        raise ConfigError(f"CLIP_benchmark cannot build {name!r} split {split!r}: {err}") from None
    except (RuntimeError, FileNotFoundError) as err:  # torchvision's "Dataset not found or corrupted"
        raise DatasetNotFoundError(f"CLIP_benchmark cannot read {name!r} from {root}: {err}") from None


class BenchmarkImages:
    """The image of sample ``<root>/<split>#<index>`` of a CLIP_benchmark dataset (picklable)."""

    def __init__(self, source: BenchmarkSource, split: str) -> None:
        self.source, self.split = source, split

    @staticmethod
    def file_of(sample: str) -> None:
        return None

    def __call__(self, sample: str) -> Image.Image:
        dataset = _benchmark_dataset(
            self.source.name, self.source.dataset_root, self.split, self.source.download
        )
        return dataset[int(sample.rpartition("#")[2])][0]


def _labels(dataset: Any) -> list[int]:
    """Every label of a torchvision-style dataset, from its label lists where it has them (no image read)."""
    for attribute in ("targets", "_labels", "labels", "y"):
        values = getattr(dataset, attribute, None)
        if values is not None and len(values) == len(dataset):
            return [int(value) for value in values]
    for attribute in ("samples", "_samples", "imgs"):
        pairs = getattr(dataset, attribute, None)
        if pairs is not None and len(pairs) == len(dataset):
            return [int(label) for _, label in pairs]
    return [int(dataset[index][1]) for index in range(len(dataset))]  # reads every image once


def _read_torchvision_style(source: BenchmarkSource, split: str) -> tuple:
    if not source.download and not Path(source.dataset_root).exists():
        # Several of CLIP_benchmark's builders fetch (wget, gdown) whenever the folder is absent.
        raise _missing(source, source.dataset_root)
    dataset = _benchmark_dataset(source.name, source.dataset_root, split, source.download)
    samples = [
        (f"{source.dataset_root}/{split}#{index:07d}", label) for index, label in enumerate(_labels(dataset))
    ]
    templates = getattr(dataset, "templates", None) or benchmark_templates_of(source.name)
    return samples, list(dataset.classes), list(templates), BenchmarkImages(source, split)


def benchmark_templates_of(name: str) -> list[str]:
    """CLIP_benchmark's templates for its dataset `name` (as its builder looks them up)."""
    table = _table("en_zeroshot_classification_templates.json")
    for key in [*_lookup_keys(name), "imagenet1k"]:
        if key in table:
            return list(table[key])
    return []


# ------------------------------------------------------------------------------------------- webdatasets


def _webdataset_folder(source: BenchmarkSource) -> Path:
    """The local folder of a webdataset: `dataset_root` if it exists, else its snapshot in the Hugging Face
    cache (downloaded only with `download`)."""
    local = Path(source.dataset_root)
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo = HUB_REPO.format(dataset_cleaned=source.cleaned)
    try:
        return Path(snapshot_download(repo, repo_type="dataset", local_files_only=not source.download))
    except LocalEntryNotFoundError:
        raise _missing(source, f"{local} nor in the Hugging Face cache ({repo})") from None


def _text_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _key_and_extension(member: str) -> tuple[str, str]:
    """webdataset's `base_plus_ext`: the key is the path up to the first dot of the file name."""
    folder, _, filename = member.rpartition("/")
    stem, _, extension = filename.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


class WebdatasetImages:
    """The image of sample ``<shard>#<key>``, read straight from its place in the tar (picklable)."""

    def __init__(self, places: dict[str, tuple[int, int]]) -> None:
        self.places = places  # sample -> (offset of the image bytes in the shard, their size)

    @staticmethod
    def file_of(sample: str) -> str:
        return sample.rpartition("#")[0]

    def __call__(self, sample: str) -> Image.Image:
        offset, size = self.places[sample]
        with open(self.file_of(sample), "rb") as shard:
            shard.seek(offset)
            data = shard.read(size)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.copy()


def _read_webdataset(folder: Path, split: str) -> tuple:
    nshards_file = folder / split / "nshards.txt"
    if not nshards_file.is_file():
        raise DatasetNotFoundError(f"{folder} has no split {split!r}: {nshards_file} is missing")
    shards = [folder / split / f"{index}.tar" for index in range(int(nshards_file.read_text().strip()))]
    samples: list[tuple[str, int]] = []
    places: dict[str, tuple[int, int]] = {}
    for shard in shards:
        images: dict[str, tuple[int, int]] = {}
        labels: dict[str, int] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = _key_and_extension(member.name)
                if extension in WDS_IMAGE_EXTENSIONS:
                    images[key] = (member.offset_data, member.size)
                elif extension == "cls":
                    labels[key] = int(tar.extractfile(member).read().decode().strip())
        for key, place in images.items():
            if key not in labels:
                raise MalformedDatasetError(f"{shard}: sample {key!r} has an image but no .cls label.")
            sample = f"{shard}#{key}"
            places[sample] = place
            samples.append((sample, labels[key]))
    classnames_file = folder / "classnames.txt"
    if not classnames_file.is_file():
        raise MalformedDatasetError(
            f"{folder} has no classnames.txt (one class name a line, in label order)."
        )
    templates_file = folder / "zeroshot_classification_templates.txt"
    templates = _text_lines(templates_file) if templates_file.is_file() else []
    return samples, _text_lines(classnames_file), templates, WebdatasetImages(places)
