"""Characters drawn with the TrueType fonts that matplotlib ships, and `glyphs`, a dataset of them.

matplotlib installs DejaVu, STIX and Computer Modern fonts (`matplotlib/mpl-data/fonts/ttf`); 22 of
its files draw the Latin digits and letters (`FACES`; the others are display, math-symbol and
last-resort fonts). They are split once, by file:

- the 17 of `PRETRAINING_FACES` draw the miniature CLIP's pretraining corpus (`kr_vlm.data.corpus`);
- the 5 of `HELD_OUT_FACES` (`DejaVuSansMono`, `DejaVuSansMono-Oblique`, `DejaVuSerif-Italic`,
  `STIXGeneralBolIta`, `cmtt10`) never appear in pretraining: `glyphs` is drawn with them, so it
  measures transfer to typefaces the model has not seen (cross-dataset transfer).

`glyphs` has 36 classes: the digits `zero` .. `nine` (the class names of `digits`) and the lowercase
letters `letter a` .. `letter z`, in that order. Each class is drawn in each held-out font in 10
variants, dark on a white 64 px page, with a size, aspect, rotation, position and stroke width drawn
from a seed fixed per image (the same image on every machine). Variants 0-4 are `train`, 5-6 `val`,
7-9 `test`: 900 / 360 / 540 images, every font and class in every split. Samples carry virtual paths
`glyphs/<font file stem>/<class index>/<variant>`; nothing is read from disk, so `build_glyphs`
ignores `root` (as `build_digits` does).

The drawing (`draw_glyph`, `pixelated_glyph`) is shared with the pretraining corpus, which draws the
same way over wider ranges.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from kr_vlm.data.base import ImageListDataset
from kr_vlm.data.digits import CLASSNAMES as DIGIT_NAMES
from kr_vlm.data.digits import GRID_SIZE, IMAGE_SIZE, INK_LEVELS, ink_from_counts, ink_grid_page

FONT_SIZE = 160  # px: glyphs are drawn large, then transformed and reduced, so edges stay smooth
SUPERSAMPLE = 4  # a page is drawn at 4x its side and reduced by box averaging (anti-aliasing)
# scikit-learn's digits: a 32x32 bitmap of the character, reduced to 8x8 ink counts.
BITMAP_SIZE = GRID_SIZE * int(math.sqrt(INK_LEVELS))


@dataclass(frozen=True)
class FontFace:
    """One of matplotlib's font files and the words a caption uses for it.

    Attributes:
        stem: the file name without `.ttf` in `matplotlib/mpl-data/fonts/ttf`.
        family: `serif`, `sans-serif`, `monospace` or `typewriter`.
        bold, italic: the face's weight and slant.
        symbols: whether its ASCII code points hold the usual symbols (TeX's math italic `cmmi10` puts
            other glyphs there).
    """

    stem: str
    family: str
    bold: bool = False
    italic: bool = False
    symbols: bool = True

    @property
    def path(self) -> Path:
        return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / f"{self.stem}.ttf"


def _four_faces(prefix: str, family: str, bold: str, italic: str, bold_italic: str) -> list[FontFace]:
    return [
        FontFace(prefix, family),
        FontFace(f"{prefix}{bold}", family, bold=True),
        FontFace(f"{prefix}{italic}", family, italic=True),
        FontFace(f"{prefix}{bold_italic}", family, bold=True, italic=True),
    ]


FACES: tuple[FontFace, ...] = (
    *_four_faces("DejaVuSans", "sans-serif", "-Bold", "-Oblique", "-BoldOblique"),
    *_four_faces("DejaVuSansMono", "monospace", "-Bold", "-Oblique", "-BoldOblique"),
    *_four_faces("DejaVuSerif", "serif", "-Bold", "-Italic", "-BoldItalic"),
    *_four_faces("STIXGeneral", "serif", "Bol", "Italic", "BolIta"),
    FontFace("cmr10", "serif"),
    FontFace("cmb10", "serif", bold=True),
    FontFace("cmti10", "serif", italic=True),
    FontFace("cmmi10", "serif", italic=True, symbols=False),
    FontFace("cmss10", "sans-serif"),
    FontFace("cmtt10", "typewriter"),
)
HELD_OUT_STEMS: tuple[str, ...] = (
    "DejaVuSansMono",
    "DejaVuSansMono-Oblique",
    "DejaVuSerif-Italic",
    "STIXGeneralBolIta",
    "cmtt10",
)
HELD_OUT_FACES: tuple[FontFace, ...] = tuple(face for face in FACES if face.stem in HELD_OUT_STEMS)
PRETRAINING_FACES: tuple[FontFace, ...] = tuple(face for face in FACES if face.stem not in HELD_OUT_STEMS)

DIGITS = string.digits
LOWERCASE = string.ascii_lowercase
UPPERCASE = string.ascii_uppercase
SYMBOL_NAMES: dict[str, str] = {
    "+": "plus sign",
    "=": "equals sign",
    "%": "percent sign",
    "#": "hash sign",
    "?": "question mark",
    "!": "exclamation mark",
    "&": "ampersand",
    "*": "asterisk",
    "/": "slash",
    "@": "at sign",
}


def character_name(char: str) -> str:
    """The class name of a character: `seven`, `letter q`, `capital letter Q`, `plus sign`.

    Captions and prompts need words for case: open_clip's tokenizer lowercases all text.
    """
    if char in DIGITS:
        return DIGIT_NAMES[DIGITS.index(char)]
    if char in LOWERCASE:
        return f"letter {char}"
    if char in UPPERCASE:
        return f"capital letter {char}"
    if char in SYMBOL_NAMES:
        return SYMBOL_NAMES[char]
    raise ValueError(
        f"No name for character {char!r}: kr_vlm draws digits, ASCII letters and {''.join(SYMBOL_NAMES)}."
    )


@dataclass(frozen=True)
class GlyphStyle:
    """How a character sits on the page.

    Attributes:
        height: the glyph's height (before rotation) as a share of the page side.
        aspect: a multiplier of its width.
        rotation: degrees, counter-clockwise.
        slant: horizontal shear; positive leans the top to the right, as italics do.
        offset: the shift of its centre, `(right, down)` as shares of the page side.
        stroke: pixels at FONT_SIZE added to (positive) or taken from (negative) each side of a stroke.
    """

    height: float = 0.6
    aspect: float = 1.0
    rotation: float = 0.0
    slant: float = 0.0
    offset: tuple[float, float] = (0.0, 0.0)
    stroke: int = 0


@lru_cache(maxsize=64)
def _font(face: FontFace) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(face.path), FONT_SIZE)


def glyph_ink(char: str, face: FontFace, stroke: int = 0) -> Image.Image:
    """`char` in `face` at FONT_SIZE as an ink map (mode L, 255 = ink), cropped to its bounding box."""
    canvas = Image.new("L", (2 * FONT_SIZE, 2 * FONT_SIZE), 0)
    ImageDraw.Draw(canvas).text(
        (FONT_SIZE, FONT_SIZE),
        char,
        font=_font(face),
        fill=255,
        anchor="mm",
        stroke_width=max(stroke, 0),
        stroke_fill=255,
    )
    box = canvas.getbbox()
    if box is None:
        raise ValueError(f"Font {face.stem} draws nothing for {char!r}.")
    ink = canvas.crop(box)
    if stroke < 0:  # thinned after cropping: the filter's cost grows with the area
        ink = ink.filter(ImageFilter.MinFilter(2 * -stroke + 1))
        ink = ink.crop(ink.getbbox() or (0, 0, ink.width, ink.height))
    return ink


def _affine(ink: Image.Image, style: GlyphStyle, scale: float, side: int) -> Image.Image:
    """`ink` scaled by `scale`, stretched, slanted, rotated and moved as `style` says, on a `side` page."""
    angle = math.radians(style.rotation)
    # Image coordinates point down: a counter-clockwise turn on screen is this matrix.
    rotate = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    slant = np.array([[1.0, -style.slant], [0.0, 1.0]])
    stretch = np.diag([scale * style.aspect, scale])
    forward = rotate @ slant @ stretch
    inverse = np.linalg.inv(forward)
    glyph_centre = np.array([ink.width / 2, ink.height / 2])
    page_centre = np.array([side / 2 + style.offset[0] * side, side / 2 + style.offset[1] * side])
    shift = glyph_centre - inverse @ page_centre
    coefficients = (inverse[0, 0], inverse[0, 1], shift[0], inverse[1, 0], inverse[1, 1], shift[1])
    return ink.transform(
        (side, side), Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BILINEAR, fillcolor=0
    )


def draw_glyph(char: str, face: FontFace, style: GlyphStyle) -> Image.Image:
    """`char` in `face`, placed by `style`, as an ink map (mode L, 255 = ink) on an IMAGE_SIZE page."""
    ink = glyph_ink(char, face, style.stroke)
    side = IMAGE_SIZE * SUPERSAMPLE
    page = _affine(ink, style, style.height * side / ink.height, side)
    return page.reduce(SUPERSAMPLE)


def glyph_ink_counts(char: str, face: FontFace, style: GlyphStyle) -> np.ndarray:
    """`char` in `face` reduced the way scikit-learn's digits were made: 8x8 ink counts 0..16.

    The glyph (stretched, slanted and rotated by `style`) is cropped to its bounding box, scaled to
    fill a 32x32 bitmap on its longer side and centred, thresholded, and each 4x4 block's inked
    pixels are counted. `style.height` and `style.offset` play no part: the reduction normalises size
    and position, as it did for the digits.
    """
    ink = glyph_ink(char, face, style.stroke)
    placement = GlyphStyle(aspect=style.aspect, rotation=style.rotation, slant=style.slant)
    placed = _affine(ink, placement, 1.0, 2 * FONT_SIZE)
    box = placed.getbbox()
    if box is None:
        raise ValueError(f"Font {face.stem} draws nothing for {char!r}.")
    glyph = placed.crop(box)
    fit = BITMAP_SIZE / max(glyph.size)
    width, height = (max(1, round(length * fit)) for length in glyph.size)
    bitmap = Image.new("L", (BITMAP_SIZE, BITMAP_SIZE), 0)
    bitmap.paste(
        glyph.resize((width, height), Image.Resampling.BILINEAR),
        ((BITMAP_SIZE - width) // 2, (BITMAP_SIZE - height) // 2),
    )
    block = BITMAP_SIZE // GRID_SIZE
    inked = np.asarray(bitmap) >= 128
    return inked.reshape(GRID_SIZE, block, GRID_SIZE, block).sum(axis=(1, 3))


def pixelated_glyph(char: str, face: FontFace, style: GlyphStyle) -> Image.Image:
    """`glyph_ink_counts` drawn as `kr_vlm.data.digits` draws its digits: an ink map on an IMAGE_SIZE page."""
    return ink_grid_page(ink_from_counts(glyph_ink_counts(char, face, style)))


# ------------------------------------------------------------------------------------- the dataset

GLYPH_CHARACTERS = DIGITS + LOWERCASE
CLASSNAMES: tuple[str, ...] = tuple(character_name(char) for char in GLYPH_CHARACTERS)
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_VARIANTS: dict[str, range] = {"train": range(0, 5), "val": range(5, 7), "test": range(7, 10)}
GLYPHS_SEED = 0


def glyph_style(face_index: int, label: int, variant: int) -> GlyphStyle:
    """The style of one `glyphs` image: drawn from a seed made of its font, class and variant."""
    rng = np.random.default_rng([GLYPHS_SEED, face_index, label, variant])
    return GlyphStyle(
        height=float(rng.uniform(0.45, 0.75)),
        aspect=float(rng.uniform(0.9, 1.1)),
        rotation=float(rng.uniform(-10.0, 10.0)),
        offset=(float(rng.uniform(-0.08, 0.08)), float(rng.uniform(-0.08, 0.08))),
        stroke=int(rng.choice([0, 0, 2, 4])),
    )


def glyph_image(stem: str, label: int, variant: int) -> Image.Image:
    """Image `variant` of class `label` of `glyphs` in held-out font `stem`: RGB, dark on white."""
    face_index = HELD_OUT_STEMS.index(stem)
    style = glyph_style(face_index, label, variant)
    ink = draw_glyph(GLYPH_CHARACTERS[label], HELD_OUT_FACES[face_index], style)
    return ImageOps.invert(ink).convert("RGB")


def parse_glyph_path(path: str) -> tuple[str, int, int]:
    """`(font stem, label, variant)` of a virtual path `glyphs/<font stem>/<label>/<variant>`."""
    parts = str(path).split("/")
    valid = (
        len(parts) == 4
        and parts[0] == "glyphs"
        and parts[1] in HELD_OUT_STEMS
        and parts[2].isdigit()
        and int(parts[2]) < len(CLASSNAMES)
        and parts[3].isdigit()
    )
    if not valid:
        raise ValueError(
            f"{path!r} is not a glyphs sample path (expected 'glyphs/<font>/<label>/<variant>')."
        )
    return parts[1], int(parts[2]), int(parts[3])


class GlyphsDataset(ImageListDataset):
    """An `ImageListDataset` of virtual paths (`glyphs/<font>/<label>/<variant>`): images are drawn, not read."""

    def load_image(self, path: str) -> Image.Image:
        return glyph_image(*parse_glyph_path(path))


def build_glyphs(
    root: str | Path | None,
    split: str,
    transform: Callable[[Image.Image], Any] | None = None,
    skip_corrupt: bool = False,
) -> GlyphsDataset:
    """The `split` (`train`, `val` or `test`) of `glyphs`: digits and lowercase letters in held-out fonts.

    `root` and `skip_corrupt` are accepted so `build_dataset("glyphs", root, split)` looks like every
    other dataset; neither has an effect (nothing is read from disk).
    """
    if split not in SPLITS:
        raise ValueError(f"glyphs has no split {split!r}; its splits are {list(SPLITS)}.")
    samples = [
        (f"glyphs/{stem}/{label}/{variant}", label)
        for stem in HELD_OUT_STEMS
        for label in range(len(CLASSNAMES))
        for variant in SPLIT_VARIANTS[split]
    ]
    return GlyphsDataset(
        samples, CLASSNAMES, transform=transform, skip_corrupt=skip_corrupt, name=f"glyphs/{split}"
    )
