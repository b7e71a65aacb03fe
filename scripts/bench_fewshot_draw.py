"""Does a few-shot draw cost anything beside listing the dataset's files? Side by side, in one run.

Writes an ImageNet tree in CoOp's layout of empty placeholder files (default 1000 classes x 1300 training
images, 50 test images a class) to a temporary folder, then times reading the training split's file
list (`build_dataset`) and drawing the 16-shot split from it with each sampler (`few_shot_split`). The
draw is deterministic, so caching it could only pay if it cost a noticeable share of the listing.

    python scripts/bench_fewshot_draw.py                          # ImageNet's size
    python scripts/bench_fewshot_draw.py --classes 100 --per-class 500
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

from kr_vlm.data.fewshot import SAMPLERS, few_shot_split
from kr_vlm.data.registry import build_dataset


def write_tree(root: Path, classes: int, per_class: int) -> None:
    """CoOp's ImageNet layout: `imagenet/classnames.txt` and `imagenet/images/{train,val}/<wnid>/`."""
    folder = root / "imagenet"
    (folder / "images").mkdir(parents=True)
    wnids = [f"n{label:08d}" for label in range(classes)]
    (folder / "classnames.txt").write_text("".join(f"{wnid} class {wnid}\n" for wnid in wnids))
    for split, count in (("train", per_class), ("val", 50)):
        for wnid in wnids:
            (folder / "images" / split / wnid).mkdir(parents=True)
            for index in range(count):
                (folder / "images" / split / wnid / f"{wnid}_{index}.JPEG").touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=1300)
    parser.add_argument("--shots", type=int, default=16)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        write_tree(Path(tmp), args.classes, args.per_class)
        print(f"load average before: {os.getloadavg()}")
        started = time.perf_counter()
        train = build_dataset("imagenet", tmp, "train")
        listing = time.perf_counter() - started
        print(f"list {len(train.samples)} training files: {listing:.2f} s")
        for sampler in SAMPLERS:
            started = time.perf_counter()
            few_shot_split("imagenet", train.samples, None, args.shots, seed=1, sampler=sampler)
            draw = time.perf_counter() - started
            print(f"draw {args.shots} shots with {sampler}: {draw:.2f} s ({draw / listing:.2f} of the listing)")
        print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
