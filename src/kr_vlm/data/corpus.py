"""The image-text corpus the miniature CLIP (`kr-vlm-mini`) is pretrained on, drawn offline.

Each sample is one character (a digit, a letter of either case, or a symbol of
`glyphs.SYMBOL_NAMES`) in one of the pretraining fonts (`glyphs.PRETRAINING_FACES`; the held-out
fonts of the `glyphs` dataset never appear), drawn at a random size, aspect, rotation, slant,
stroke width and position, in random ink and paper grey levels (light on dark at times), with
blur and noise at times, on a 64 px page like the digits'. Its caption names the character and
some of what was drawn: "a bold serif seven", "the letter q, slanted", "a photo of a capital letter
G.", 'a photo of the number: "three".' (the digits' own prompt, from OpenAI's CLIP).

A share of the samples (`PIXELATED_SHARE`) is reduced the way scikit-learn's handwritten digits were
made (a 32x32 bitmap counted in 4x4 blocks: 8x8 pixels of 17 grey levels) and then drawn as
`kr_vlm.data.digits` draws them. The corpus never contains scikit-learn's digits: they stay the
held-out target.

Sample `index` of corpus `seed` depends on `(seed, index)` alone, so a corpus is the same on every
machine, in any order and with any number of worker processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageFilter
from torch.utils.data import Dataset

from kr_vlm.data.glyphs import (
    DIGITS,
    LOWERCASE,
    PRETRAINING_FACES,
    SYMBOL_NAMES,
    UPPERCASE,
    FontFace,
    GlyphStyle,
    character_name,
    draw_glyph,
    pixelated_glyph,
)

# What a sample shows: digits most (the target task), then letters and symbols for variety.
CHARACTER_GROUPS: tuple[tuple[str, float], ...] = (
    (DIGITS, 0.4),
    (LOWERCASE, 0.25),
    (UPPERCASE, 0.2),
    ("".join(SYMBOL_NAMES), 0.15),
)
PIXELATED_SHARE = 0.4
INVERTED_SHARE = 0.2  # light ink on dark paper
# Share of captions in the two prompts of kr_vlm's digit templates, so the zero-shot prompts read
# like captions the model has seen ("a photo of a seven.", 'a photo of the number: "seven".').
PHOTO_CAPTION_SHARE = 0.2
NUMBER_CAPTION_SHARE = 0.15  # of digit samples
ATTRIBUTE_SHARE = 0.6  # each word that applies to a sample enters its caption with this probability


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" and not phrase.startswith("one") else "a"


def _with_article(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def _noun_phrases(char: str) -> list[str]:
    """Ways a caption names `char`; the first is its class name (`glyphs.character_name`)."""
    name = character_name(char)
    if char in DIGITS:
        return [name, f"number {name}", f"digit {name}", f"number {char}", f"digit {char}"]
    if char in LOWERCASE:
        return [name, f"lowercase {char}", f"small letter {char}", f"lowercase letter {char}"]
    if char in UPPERCASE:
        return [name, f"capital {char}", f"uppercase {char}", f"uppercase letter {char}"]
    return [name]


def _draw_character(rng: np.random.Generator) -> str:
    groups = [group for group, _ in CHARACTER_GROUPS]
    weights = np.array([weight for _, weight in CHARACTER_GROUPS])
    group = groups[rng.choice(len(groups), p=weights / weights.sum())]
    return group[rng.integers(len(group))]


def _draw_style(rng: np.random.Generator) -> GlyphStyle:
    strong_turn = rng.random() < 0.25
    height = float(rng.uniform(0.3, 0.85))
    room = max(0.0, (0.9 - height) / 2)  # how far the centre may move with the glyph still on the page
    return GlyphStyle(
        height=height,
        aspect=float(np.exp(rng.uniform(np.log(0.75), np.log(1.33)))),
        rotation=float(rng.uniform(-45.0, 45.0) if strong_turn else rng.uniform(-12.0, 12.0)),
        slant=float(rng.uniform(-0.3, 0.3)) if rng.random() < 0.3 else 0.0,
        offset=(float(rng.uniform(-room, room)), float(rng.uniform(-room, room))),
        stroke=int(rng.choice([-2, 0, 0, 2, 4, 6])),
    )


def _style_words(
    face: FontFace, style: GlyphStyle, pixelated: bool, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """`(adjectives, trailing phrases)` true of a sample, before the caption picks some."""
    adjectives, phrases = [], []
    if not pixelated and style.height < 0.45:
        adjectives.append("small")
    if not pixelated and style.height > 0.75:
        adjectives.append("large")
    if pixelated:
        adjectives.append(["pixelated", "low-resolution", "blocky"][rng.integers(3)])
    if face.bold or style.stroke >= 4:
        adjectives.append("bold")
    elif style.stroke < 0:
        adjectives.append("thin")
    if face.italic:
        adjectives.append("italic")
    elif abs(style.slant) >= 0.15:
        adjectives.append("slanted")
    adjectives.append(face.family)
    if abs(style.rotation) >= 15:
        phrases.append("rotated left" if style.rotation > 0 else "rotated right")
    if not pixelated and max(abs(style.offset[0]), abs(style.offset[1])) > 0.1:
        phrases.append("off-center")
    return adjectives, phrases


def _caption(char: str, words: tuple[list[str], list[str]], rng: np.random.Generator) -> str:
    names = _noun_phrases(char)
    if char in DIGITS and rng.random() < NUMBER_CAPTION_SHARE:
        return f'a photo of the number: "{names[0]}".'
    if rng.random() < PHOTO_CAPTION_SHARE:
        return f"a photo of {_with_article(names[0])}."
    noun = names[rng.integers(len(names))]
    adjectives, phrases = ([word for word in kind if rng.random() < ATTRIBUTE_SHARE] for kind in words)
    form = rng.integers(3)
    if form == 0 or not (adjectives or phrases):
        caption = _with_article(" ".join([*adjectives, noun]))
        return ", ".join([caption, *phrases])
    if form == 1:
        described = [*adjectives, *phrases]
        return f"the {noun}, " + (" and ".join(described) if len(described) <= 2 else ", ".join(described))
    return (
        f"a photo of {_with_article(' '.join([*adjectives, noun]))}"
        + "".join(f", {p}" for p in phrases)
        + "."
    )


def corpus_sample(seed: int, index: int) -> tuple[Image.Image, str]:
    """Sample `index` of the corpus drawn with `seed`: an IMAGE_SIZE RGB image and its caption."""
    rng = np.random.default_rng([seed, index])
    char = _draw_character(rng)
    faces = [face for face in PRETRAINING_FACES if face.symbols or char not in SYMBOL_NAMES]
    face = faces[rng.integers(len(faces))]
    style = _draw_style(rng)
    pixelated = rng.random() < PIXELATED_SHARE
    ink = pixelated_glyph(char, face, style) if pixelated else draw_glyph(char, face, style)
    adjectives, phrases = _style_words(face, style, pixelated, rng)

    # Ink and paper grey levels: dark on light mostly, light on dark at times, faint at times.
    paper, pen = float(rng.uniform(190, 255)), float(rng.uniform(0, 70))
    if rng.random() < 0.15:
        paper, pen = float(rng.uniform(150, 210)), float(rng.uniform(70, 130))
        adjectives.insert(0, "faint")
    if rng.random() < INVERTED_SHARE:
        paper, pen = 255.0 - paper, 255.0 - pen
        phrases.append(["on a dark background", "white on black", "inverted"][rng.integers(3)])
    gray = paper + (pen - paper) * np.asarray(ink, dtype=np.float64) / 255.0
    if rng.random() < 0.3:
        radius = float(rng.uniform(0.4, 1.5))
        page = Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(radius)
        )
        gray = np.asarray(page, dtype=np.float64)
        if radius > 0.8:
            adjectives.insert(0, "blurry")
    if rng.random() < 0.3:
        sigma = float(rng.uniform(5.0, 50.0))
        gray = gray + rng.normal(0.0, sigma, size=gray.shape)
        if sigma > 20:
            adjectives.insert(0, "noisy")
    image = Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8)).convert("RGB")
    return image, _caption(char, (adjectives, phrases), rng)


class GlyphCorpus(Dataset):
    """The first `size` samples of the corpus drawn with `seed`, as `(transform(image), caption)`."""

    def __init__(
        self, size: int, seed: int = 0, transform: Callable[[Image.Image], Any] | None = None
    ) -> None:
        if size < 1:
            raise ValueError(f"A corpus needs at least one sample, got size={size}.")
        self.size = size
        self.seed = seed
        self.transform = transform

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Any, str]:
        if not 0 <= index < self.size:
            raise IndexError(f"corpus index {index} out of range 0..{self.size - 1}")
        image, caption = corpus_sample(self.seed, index)
        return (self.transform(image) if self.transform is not None else image), caption
