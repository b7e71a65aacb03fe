"""FGVC-Aircraft in CoOp's layout: `images/<id>.jpg`, `variants.txt`, `images_variant_<split>.txt`."""

from __future__ import annotations

from pathlib import Path

from kr_vlm.data.base import MalformedDatasetError
from kr_vlm.data.datasets.common import Samples, readable_classname, require_dir, require_file


def read_fgvc_aircraft(dataset_dir: Path, split: str) -> tuple[Samples, list[str]]:
    """Read one split; label = line index of the variant in `variants.txt` (as CoOp's reader)."""
    images = require_dir(dataset_dir / "images", "image folder")
    variants_path = require_file(dataset_dir / "variants.txt", "variant list")
    variants = [
        line.strip() for line in variants_path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    label_of = {variant: label for label, variant in enumerate(variants)}
    if len(label_of) != len(variants):
        raise MalformedDatasetError(f"{variants_path} lists some variant twice.")

    split_path = require_file(dataset_dir / f"images_variant_{split}.txt", "split file")
    samples: Samples = []
    for line_number, line in enumerate(split_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        # "<image id> <variant name with spaces>", e.g. "1025794 707-320"
        image_id, _, variant = line.strip().partition(" ")
        if variant not in label_of:
            raise MalformedDatasetError(
                f"{split_path}, line {line_number}: variant {variant!r} is not listed in {variants_path}."
            )
        samples.append((str(images / f"{image_id}.jpg"), label_of[variant]))
    return samples, [readable_classname(variant) for variant in variants]
