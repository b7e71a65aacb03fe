"""The pretraining corpus of the miniature CLIP (kr_vlm.data.corpus): deterministic, captioned, held-out fonts kept out."""

from __future__ import annotations

import numpy as np
import pytest
from torch.utils.data import DataLoader

from kr_vlm.data import corpus
from kr_vlm.data.corpus import GlyphCorpus, corpus_sample
from kr_vlm.data.digits import CLASSNAMES as DIGIT_NAMES
from kr_vlm.data.digits import IMAGE_SIZE
from kr_vlm.data.glyphs import DIGITS, HELD_OUT_STEMS, SYMBOL_NAMES


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_a_sample_depends_on_seed_and_index_alone():
    first = [corpus_sample(3, index) for index in range(20)]
    again = [corpus_sample(3, index) for index in reversed(range(20))][::-1]
    for (image, caption), (same_image, same_caption) in zip(first, again, strict=True):
        assert caption == same_caption and np.array_equal(pixels(image), pixels(same_image))
    other_seed = [corpus_sample(4, index) for index in range(20)]
    assert [caption for _, caption in other_seed] != [caption for _, caption in first]


def test_worker_processes_draw_the_same_corpus():
    dataset = GlyphCorpus(16, seed=5, transform=pixels)
    serial = [dataset[index] for index in range(len(dataset))]
    batches = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=list)
    parallel = [sample for batch in batches for sample in batch]
    assert [caption for _, caption in parallel] == [caption for _, caption in serial]
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(parallel, serial, strict=True))


def test_images_are_pages_like_the_digits():
    image, caption = corpus_sample(0, 0)
    assert image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert caption and pixels(image).std() > 5


def test_captions_name_what_is_drawn(monkeypatch):
    drawn = []
    original = corpus._draw_character

    def record(rng):
        drawn.append(original(rng))
        return drawn[-1]

    monkeypatch.setattr(corpus, "_draw_character", record)
    captions = [corpus_sample(1, index)[1] for index in range(200)]
    for char, caption in zip(drawn, captions, strict=True):
        if char in DIGITS:
            assert DIGIT_NAMES[int(char)] in caption or f" {char}" in caption, caption
        elif char in SYMBOL_NAMES:
            assert SYMBOL_NAMES[char] in caption, caption
        else:
            assert f" {char.lower()}" in caption.lower(), caption
            # open_clip's tokenizer lowercases: capitals must be told apart by words.
            assert ("capital" in caption or "uppercase" in caption) == char.isupper(), caption
    assert {char for char in drawn if char in DIGITS} == set(DIGITS)
    # The digits' prompts are among the captions, so zero-shot prompts read like pretraining text.
    assert any(caption.startswith('a photo of the number: "') for caption in captions)
    photo_prompts = {f"a photo of a {name}." for name in DIGIT_NAMES} | {"a photo of an eight."}
    assert photo_prompts & set(captions)


def test_held_out_fonts_never_draw_the_corpus(monkeypatch):
    faces = []
    original = corpus.draw_glyph, corpus.pixelated_glyph

    def recording(draw):
        def draw_and_record(char, face, style):
            faces.append(face.stem)
            return draw(char, face, style)

        return draw_and_record

    monkeypatch.setattr(corpus, "draw_glyph", recording(original[0]))
    monkeypatch.setattr(corpus, "pixelated_glyph", recording(original[1]))
    for index in range(300):
        corpus_sample(0, index)
    assert len(set(faces)) == 17 and not set(faces) & set(HELD_OUT_STEMS)


def test_an_empty_corpus_is_an_error():
    with pytest.raises(ValueError, match="at least one sample"):
        GlyphCorpus(0)
