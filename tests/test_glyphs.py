"""The `glyphs` dataset and the drawing it shares with the pretraining corpus (kr_vlm.data.glyphs)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from benchmark_helpers import TEMPLATE_KIND_PARAMS
from kr_vlm.data import FewShotDataModule, build_dataset, get_templates
from kr_vlm.data.digits import IMAGE_SIZE
from kr_vlm.data.glyphs import (
    CLASSNAMES,
    DIGITS,
    FACES,
    HELD_OUT_FACES,
    HELD_OUT_STEMS,
    PRETRAINING_FACES,
    GlyphsDataset,
    GlyphStyle,
    character_name,
    glyph_image,
    glyph_ink_counts,
    parse_glyph_path,
)

SPLIT_SIZES = {"train": 900, "val": 360, "test": 540}


def test_font_split_is_disjoint_and_every_font_file_exists():
    assert len(FACES) == 22 and len(HELD_OUT_FACES) == 5 and len(PRETRAINING_FACES) == 17
    assert {face.stem for face in HELD_OUT_FACES} == set(HELD_OUT_STEMS)
    assert not {face.stem for face in HELD_OUT_FACES} & {face.stem for face in PRETRAINING_FACES}
    assert all(face.path.is_file() for face in FACES)


def test_classes_are_digits_then_lowercase_letters():
    assert len(CLASSNAMES) == 36
    assert CLASSNAMES[:10] == ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    assert CLASSNAMES[10] == "letter a" and CLASSNAMES[35] == "letter z"
    assert (character_name("Q"), character_name("%")) == ("capital letter Q", "percent sign")
    with pytest.raises(ValueError, match="No name for character"):
        character_name("~")


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_splits_hold_every_font_and_class(split):
    dataset = build_dataset("glyphs", "/anywhere", split)
    assert isinstance(dataset, GlyphsDataset) and len(dataset) == SPLIT_SIZES[split]
    assert dataset.classnames == list(CLASSNAMES)
    fonts = {parse_glyph_path(path)[0] for path, _ in dataset.samples}
    assert fonts == set(HELD_OUT_STEMS)
    assert np.bincount(dataset.labels).tolist() == [SPLIT_SIZES[split] // 36] * 36


def test_splits_are_disjoint():
    paths = {
        split: {path for path, _ in build_dataset("glyphs", None, split).samples} for split in SPLIT_SIZES
    }
    assert not paths["train"] & paths["val"] and not paths["train"] & paths["test"]
    assert not paths["val"] & paths["test"]


def test_images_are_deterministic_dark_on_white_pages():
    dataset = build_dataset("glyphs", None, "test")
    path, label = dataset.samples[123]
    image, same_label = dataset[123]
    assert same_label == label and image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE)
    pixels = np.asarray(image, dtype=np.int16)
    assert np.array_equal(pixels, np.asarray(glyph_image(*parse_glyph_path(path)), dtype=np.int16))
    assert pixels[0, 0, 0] == 255 and pixels.min() < 64  # white paper, dark ink
    other = np.asarray(dataset[124][0], dtype=np.int16)
    assert not np.array_equal(pixels, other)


def test_bad_paths_and_splits_are_clear_errors():
    with pytest.raises(ValueError, match="not a glyphs sample path"):
        parse_glyph_path("glyphs/DejaVuSans/3/0")  # a pretraining font
    with pytest.raises(ValueError, match="no split 'holdout'"):
        build_dataset("glyphs", None, "holdout")


@pytest.mark.parametrize("kind", TEMPLATE_KIND_PARAMS)
def test_templates_exist_for_every_kind(kind):
    assert all(template.count("{}") == 1 for template in get_templates("glyphs", kind))


def test_a_datamodule_trains_and_tests_on_glyphs(tmp_path):
    datamodule = FewShotDataModule("glyphs", root=tmp_path, shots=2, num_workers=0)
    datamodule.set_transforms(np.array, np.array)
    datamodule.setup("fit")
    assert len(datamodule.train_dataset) == 2 * 36 and datamodule.train_task.classnames == CLASSNAMES
    assert [task.name for task in datamodule.test_tasks] == ["glyphs"]
    images, labels = next(iter(datamodule.test_dataloader()[0]))
    assert images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3) and labels.max() < 36


def test_reduced_glyphs_look_like_scikit_learns_digits():
    """The corpus's 8x8 reduction: counts 0..16 filling the grid's height, as `load_digits`' do.

    Calibration: a logistic regression trained on the pretraining fonts' reduced digits, with no
    variation at all, scores well above chance on the 1797 handwritten digits (55 % with 23 fonts).
    """
    counts = np.array(
        [glyph_ink_counts(char, face, GlyphStyle()) for face in PRETRAINING_FACES for char in DIGITS]
    )
    labels = np.tile(np.arange(10), len(PRETRAINING_FACES))
    assert counts.min() == 0 and counts.max() == 16 and counts.dtype.kind == "i"
    rows_inked = (counts.sum(axis=2) > 0).sum(axis=1)
    assert (rows_inked >= 7).all()  # the height fills the grid (load_digits: always 8 rows)
    handwritten = load_digits()
    classifier = LogisticRegression(max_iter=3000).fit(counts.reshape(len(counts), -1), labels)
    assert classifier.score(handwritten.data, handwritten.target) > 0.45
