"""`digits`: a small classification set that ships inside scikit-learn, for offline demos and tests.

scikit-learn's handwritten digits (`sklearn.datasets.load_digits`: 1797 images of 8x8 pixels, 10
classes, no download) become 64x64 RGB images: the 8x8 digit, with a margin, is upsampled smoothly
(bicubic) and drawn dark on white, as handwriting on paper. The model's own transform does
the final resize (224 px for ViT-B/16).

The split is fixed (seed 0, stratified): per class 50 % train, 20 % val, 30 % test, about 900 / 360
/ 540 images. Each split exists in five domains, the same digits drawn differently, so the
distribution-shift path has something to measure offline:

- `clean`: dark ink on white;
- `inverted`: white ink on black;
- `rotated`: rotated by 25 to 50 degrees, left or right;
- `noisy`: strong Gaussian pixel noise (sigma 64 on 0..255);
- `edges`: only the outline of the strokes.

Every rotation angle and noise pattern depends only on the domain and the image index, so an image
is the same in every run, worker and machine. Samples carry virtual paths `digits/<domain>/<index>`
(index into `load_digits()`); nothing is read from disk, which is why `build_digits` ignores `root`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageFilter, ImageOps

from kr_vlm.data.base import ImageListDataset

CLASSNAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DOMAINS: tuple[str, ...] = ("clean", "inverted", "rotated", "noisy", "edges")
SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_SIZE = 64  # side of the returned RGB images, in pixels
GRID_SIZE = 8  # load_digits' images are 8x8 ...
INK_LEVELS = 16  # ... of ink counts 0..16: 4x4 blocks of a 32x32 bitmap, each pixel inked or not
PAD_PIXELS = 2  # empty 8x8-grid pixels around the digit: it covers 8/12 of the page
SPLIT_SEED = 0
SPLIT_FRACTIONS = {"train": 0.5, "val": 0.2}  # the rest of each class is test
NOISE_SIGMA = 64.0
ROTATION_DEGREES = (25.0, 50.0)


def ink_from_counts(counts: np.ndarray) -> np.ndarray:
    """`load_digits`' ink counts (0..INK_LEVELS) as uint8 intensities (0 = no ink, 255 = full ink)."""
    return np.rint(np.asarray(counts) * (255.0 / INK_LEVELS)).astype(np.uint8)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as uint8 ink intensities (0 = no ink, 255 = full ink), and their labels."""
    from sklearn.datasets import load_digits  # imported here: scikit-learn is only needed for digits

    bunch = load_digits()
    return ink_from_counts(bunch.images), bunch.target.astype(np.int64)


@lru_cache(maxsize=1)
def split_indices() -> dict[str, list[int]]:
    """The indices into `load_digits()` of each split: stratified, fixed, disjoint, sorted."""
    _, labels = _digits()
    rng = random.Random(SPLIT_SEED)
    splits: dict[str, list[int]] = {split: [] for split in SPLITS}
    for label in range(len(CLASSNAMES)):
        members = [int(i) for i in np.flatnonzero(labels == label)]
        rng.shuffle(members)
        n_train = round(len(members) * SPLIT_FRACTIONS["train"])
        n_val = round(len(members) * SPLIT_FRACTIONS["val"])
        splits["train"] += members[:n_train]
        splits["val"] += members[n_train : n_train + n_val]
        splits["test"] += members[n_train + n_val :]
    return {split: sorted(indices) for split, indices in splits.items()}


def ink_grid_page(ink: np.ndarray) -> Image.Image:
    """An 8x8 grid of uint8 ink intensities as a grayscale ink map (255 = ink) on an IMAGE_SIZE page.

    The grid is padded with empty pixels before upsampling: strokes touch the grid's edge, and
    without the padding the smooth filter would cut them off straight at the border.
    """
    padded = np.pad(ink, PAD_PIXELS)
    return Image.fromarray(padded).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)


def _ink_page(index: int) -> Image.Image:
    """Digit `index` as a grayscale ink map (255 = ink) on an IMAGE_SIZE page."""
    ink, _ = _digits()
    return ink_grid_page(ink[index])


def _domain_rng(domain: str, index: int) -> np.random.Generator:
    # A seed made of the domain's position and the index: the same draw on every machine and worker.
    return np.random.default_rng([SPLIT_SEED, DOMAINS.index(domain), index])


def digit_image(index: int, domain: str = "clean") -> Image.Image:
    """Digit `index` of `load_digits()` drawn in `domain`, as an IMAGE_SIZE x IMAGE_SIZE RGB image."""
    if domain not in DOMAINS:
        raise ValueError(f"Unknown digits domain {domain!r}; choose one of {', '.join(DOMAINS)}.")
    ink = _ink_page(index)
    if domain == "inverted":
        gray = ink
    elif domain == "edges":
        # The outline of the strokes (dilation minus erosion), at full contrast, dark on white.
        outline = ImageChops.subtract(
            ink.filter(ImageFilter.MaxFilter(5)), ink.filter(ImageFilter.MinFilter(5))
        )
        gray = ImageOps.invert(ImageOps.autocontrast(outline))
    else:
        gray = ImageOps.invert(ink)
        if domain == "rotated":
            rng = _domain_rng(domain, index)
            angle = rng.uniform(*ROTATION_DEGREES) * rng.choice((-1.0, 1.0))
            gray = gray.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=255)
        elif domain == "noisy":
            noise = _domain_rng(domain, index).normal(0.0, NOISE_SIGMA, size=(IMAGE_SIZE, IMAGE_SIZE))
            gray = Image.fromarray(
                np.clip(np.asarray(gray, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
            )
    return gray.convert("RGB")


def parse_digit_path(path: str) -> tuple[str, int]:
    """`(domain, index)` of a virtual path `digits/<domain>/<index>`."""
    parts = str(path).split("/")
    if len(parts) != 3 or parts[0] != "digits" or parts[1] not in DOMAINS or not parts[2].isdigit():
        raise ValueError(f"{path!r} is not a digits sample path (expected 'digits/<domain>/<index>').")
    return parts[1], int(parts[2])


class DigitsDataset(ImageListDataset):
    """An `ImageListDataset` whose paths are virtual (`digits/<domain>/<index>`): images are drawn, not read.

    It takes `ImageListDataset`'s arguments, so a subset of its samples (a few-shot split) is built
    the same way as for any other dataset. `skip_corrupt` has no effect: a drawn image cannot be corrupt.
    """

    def load_image(self, path: str) -> Image.Image:
        domain, digit_index = parse_digit_path(path)
        return digit_image(digit_index, domain)


def build_digits(
    root: str | Path | None,
    split: str,
    domain: str = "clean",
    transform: Callable[[Image.Image], Any] | None = None,
    skip_corrupt: bool = False,
) -> DigitsDataset:
    """The `split` (`train`, `val` or `test`) of the embedded digits set, drawn in `domain`.

    `root` is ignored: the images come from scikit-learn, not from the data folder (it is accepted so
    `build_dataset("digits", root, split)` looks like every other dataset). `skip_corrupt` is accepted
    for the same reason and has no effect.
    """
    if split not in SPLITS:
        raise ValueError(f"digits has no split {split!r}; its splits are {list(SPLITS)}.")
    if domain not in DOMAINS:
        raise ValueError(f"Unknown digits domain {domain!r}; choose one of {', '.join(DOMAINS)}.")
    _, labels = _digits()
    samples = [(f"digits/{domain}/{index}", int(labels[index])) for index in split_indices()[split]]
    name = "digits" if domain == "clean" else f"digits_{domain}"
    return DigitsDataset(
        samples, CLASSNAMES, transform=transform, skip_corrupt=skip_corrupt, name=f"{name}/{split}"
    )
