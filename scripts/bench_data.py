"""Is few-shot training input-bound? Images per second of the data path beside the training step rate.

The data path is the real one: synthetic JPEGs (default 200 of 500x375 px, the size of a typical Oxford
Pets photo) are written to a temporary folder in CoOp's layout (as `oxford_pets`), read by
`FewShotDataModule` and passed through open_clip's 224 px transforms: the training transform (random
resized crop) and the evaluation transform (resize and centre crop), both decode the JPEG first. Each
row times one full pass over the images after a warm-up pass (the workers persist between passes, as in
training), with 0, 2 and 4 DataLoader workers by default.

The step rate comes from `kr_vlm.benchmarks.training_step` (what `scripts/bench_adapters.py` times: its
`build_base_model`, `build_run`, `make_batch` and `timed_step`): a KRAdapter training step of open_clip ViT-B-16 (random init) at the same batch size, in
images per second. If the data path delivers fewer images per second than the step consumes, training is
input-bound at that worker count.

    python scripts/bench_data.py                      # the defaults above
    python scripts/bench_data.py --workers 0 4 8 --batch-size 32 --images 400 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from kr_vlm.benchmarks import training_step as bench
from kr_vlm.data.datamodules import FewShotDataModule
from kr_vlm.errors import command_boundary
from kr_vlm.table_text import markdown_table


def write_synthetic_coop_set(root: Path, images: int, classes: int, width: int, height: int) -> None:
    """`images` JPEGs in CoOp's `oxford_pets` layout in the train split (plus 4 val and 1 test image a class).

    Each picture is smooth colour blobs with a little grain, so it compresses like a photo (tens of KB),
    unlike pure noise (which would make decoding look slower than it is).
    """
    rng = np.random.default_rng(0)
    image_dir = root / "oxford_pets" / "images"
    image_dir.mkdir(parents=True)
    table: dict[str, list] = {"train": [], "val": [], "test": []}
    val_end = images + 4 * classes  # 4 val images a class: the few-shot val split needs no repeats
    for index in range(val_end + classes):
        label = index % classes
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        picture = np.asarray(
            Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.int16
        )
        picture = np.clip(picture + rng.normal(0, 6, picture.shape), 0, 255).astype(np.uint8)
        name = f"class_{label}_{index:05d}.jpg"
        Image.fromarray(picture).save(image_dir / name, quality=90)
        split = "train" if index < images else ("val" if index < val_end else "test")
        table[split].append([name, label, f"class_{label}"])
    (root / "oxford_pets" / "split_zhou_OxfordPets.json").write_text(json.dumps(table))


def loader_rate(dm: FewShotDataModule, which: str) -> float:
    """Images per second of one pass over the training images, after one warm-up pass."""
    loader = dm.train_dataloader()
    if which == "eval":  # the same images through the evaluation transform
        dm.train_dataset.transform = dm.eval_transform
    for _ in loader:  # warm-up: starts the (persistent) workers and fills the page cache
        pass
    start = time.perf_counter()
    count = sum(len(labels) for _, labels in loader)
    rate = count / (time.perf_counter() - start)
    dm.train_dataset.transform = dm.train_transform
    return rate


def data_rates(root: Path, args: argparse.Namespace) -> list[dict]:
    """One row per (workers, transform kind): images per second."""
    train_transform = open_clip.image_transform(args.image_size, is_train=True)
    eval_transform = open_clip.image_transform(args.image_size, is_train=False)
    rows = []
    for workers in args.workers:
        for which in ("train", "eval"):
            dm = FewShotDataModule(
                "oxford_pets",
                root=root,
                shots=args.images // args.classes,
                batch_size=args.batch_size,
                num_workers=workers,
                pin_memory=args.device.startswith("cuda"),
            )
            dm.set_transforms(train_transform, eval_transform)
            dm.setup()
            rows.append({"workers": workers, "transform": which, "images_per_s": loader_rate(dm, which)})
    return rows


def model_rate(args: argparse.Namespace) -> tuple[float, str]:
    """Images per second of a KRAdapter training step (kr_vlm.benchmarks.training_step), and what was measured."""
    device = torch.device(args.device)
    targets = bench.TARGET_SETS[args.model_targets]
    torch.manual_seed(0)
    base_model = bench.build_base_model(targets, device)
    run = bench.build_run("kradapter", base_model, targets)
    del base_model
    batch = bench.make_batch(run.model, args.model_batch_size, device)
    bench.timed_step(run, batch)  # warm-up
    step_ms = statistics.median(
        bench.timed_step(run, batch) for _ in range(args.model_steps)
    )
    return args.model_batch_size / (step_ms / 1000), (
        f"KRAdapter training step, {bench.MODEL_NAME} random init, targets {args.model_targets}, "
        f"batch {args.model_batch_size}, {args.device}: {step_ms:.0f} ms (median of {args.model_steps})"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="training images to write and read")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--image-size", type=int, default=224, help="the model's input size")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--batch-size", type=int, default=32, help="CLIP-LoRA trains with 32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-targets", default="mlp", help="kr_vlm.benchmarks.training_step target set (mlp or all)")
    parser.add_argument("--model-steps", type=int, default=3, help="timed model steps (after one warm-up)")
    parser.add_argument(
        "--model-batch-size",
        type=int,
        help="batch of the model step (default: --batch-size); a smaller one keeps a CPU run short, and the "
        "step rate is compared in images per second",
    )
    parser.add_argument("--skip-model", action="store_true", help="time the data path only")
    args = parser.parse_args(argv)
    if args.images < args.classes:
        parser.error("--images must be at least --classes")
    args.model_batch_size = args.model_batch_size or args.batch_size
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; print the table; return the measurements."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kr_vlm_bench_data_") as tmp:
        root = Path(tmp)
        write_synthetic_coop_set(root, args.images, args.classes, args.width, args.height)
        jpeg_kb = statistics.mean(path.stat().st_size for path in root.rglob("*.jpg")) / 1024
        rows = data_rates(root, args)
    if args.skip_model:
        step_rate, step_note = None, "skipped (--skip-model)"
    else:
        step_rate, step_note = model_rate(args)

    print(
        f"Data path: {args.images} JPEGs of {args.width}x{args.height} px (mean {jpeg_kb:.0f} KB) in CoOp layout "
        f"-> FewShotDataModule -> open_clip {args.image_size} px transforms, batch {args.batch_size}; "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}. One timed pass after a warm-up pass.\n"
        f"Model: {step_note}.\n"
    )
    cells = []
    for row in rows:
        model_column = f"{step_rate:.3g}" if step_rate else "n/a"
        bound = "n/a" if not step_rate else ("yes" if row["images_per_s"] < step_rate else "no")
        cells.append([row["workers"], row["transform"], f"{row['images_per_s']:.1f}", model_column, bound])
    header = ["workers", "transform", "images/s", "model step images/s", "input-bound?"]
    print(markdown_table(header, cells, ["right", "left", "right", "right", "left"]))
    return {"rows": rows, "model_images_per_s": step_rate, "model": step_note, "jpeg_kb": jpeg_kb}


if __name__ == "__main__":
    with command_boundary():
        main(sys.argv[1:])
