"""The embedded digits set (kr_vlm.data.digits): classes, splits, domains, images, registry access."""

from __future__ import annotations

import numpy as np
import pytest
import torchvision.transforms as T

from benchmark_helpers import TEMPLATE_KIND_PARAMS
from kr_vlm.data.base import ImageListDataset
from kr_vlm.data.digits import (
    CLASSNAMES,
    DOMAINS,
    IMAGE_SIZE,
    DigitsDataset,
    build_digits,
    digit_image,
    parse_digit_path,
    split_indices,
)
from kr_vlm.data.registry import build_dataset
from kr_vlm.data.templates import get_templates


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_ten_classes_named_as_words():
    assert len(CLASSNAMES) == 10
    assert CLASSNAMES[0] == "zero" and CLASSNAMES[9] == "nine"
    assert build_digits(None, "train").classnames == list(CLASSNAMES)


def test_splits_are_disjoint_cover_everything_and_are_stratified():
    splits = split_indices()
    sets = {name: set(indices) for name, indices in splits.items()}
    assert (
        not sets["train"] & sets["val"]
        and not sets["train"] & sets["test"]
        and not sets["val"] & sets["test"]
    )
    assert len(sets["train"] | sets["val"] | sets["test"]) == 1797
    for split, fraction in (("train", 0.5), ("val", 0.2), ("test", 0.3)):
        dataset = build_digits(None, split)
        assert abs(len(dataset) - 1797 * fraction) < 10
        per_class = np.bincount(dataset.labels, minlength=10)
        assert per_class.min() > 0.8 * per_class.mean()  # every class in its share


def test_splits_are_deterministic():
    # Recompute without the cache: the fixed seed gives the same split.
    assert split_indices.__wrapped__() == split_indices()
    assert build_digits(None, "test").samples == build_digits("/elsewhere", "test").samples


@pytest.mark.parametrize("domain", DOMAINS)
def test_images_are_rgb_of_the_documented_size(domain):
    image = digit_image(5, domain)
    assert image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert pixels(image).std() > 20  # not a blank page


def test_clean_is_dark_ink_on_white_and_inverted_the_opposite():
    clean, inverted = pixels(digit_image(0, "clean")), pixels(digit_image(0, "inverted"))
    assert clean[0, 0].tolist() == [255, 255, 255]
    assert inverted[0, 0].tolist() == [0, 0, 0]
    np.testing.assert_array_equal(clean, 255 - inverted)


@pytest.mark.parametrize("domain", [d for d in DOMAINS if d != "clean"])
def test_domains_differ_from_clean_and_are_deterministic(domain):
    clean = pixels(digit_image(11, "clean"))
    shifted = pixels(digit_image(11, domain))
    assert np.abs(shifted - clean).mean() > 10
    np.testing.assert_array_equal(shifted, pixels(digit_image(11, domain)))


def test_random_domains_vary_with_the_index():
    # The rotation and the noise are drawn per image, not once for the whole domain.
    first, second = pixels(digit_image(3, "noisy")), pixels(digit_image(4, "noisy"))
    noise_first = first - pixels(digit_image(3, "clean"))
    noise_second = second - pixels(digit_image(4, "clean"))
    assert not np.array_equal(noise_first, noise_second)


def test_build_digits_samples_and_items():
    dataset = build_digits(None, "val", domain="rotated", transform=T.ToTensor())
    assert isinstance(dataset, DigitsDataset) and isinstance(dataset, ImageListDataset)
    assert dataset.name == "digits_rotated/val"
    path, label = dataset.samples[0]
    assert path.startswith("digits/rotated/")
    image, item_label = dataset[0]
    assert item_label == label
    assert tuple(image.shape) == (3, IMAGE_SIZE, IMAGE_SIZE)
    dataset.transform = None
    assert dataset[0][0].size == (IMAGE_SIZE, IMAGE_SIZE)


def test_a_subset_is_built_like_any_image_list():
    source = build_digits(None, "train", domain="edges")
    subset = DigitsDataset(source.samples[:3], source.classnames, name="few")
    assert pixels(subset[2][0]).tolist() == pixels(source[2][0]).tolist()


def test_registry_builds_digits():
    dataset = build_dataset("digits", "/no/such/root", "test", domain="noisy")
    assert isinstance(dataset, DigitsDataset)
    assert dataset.samples == build_digits(None, "test", domain="noisy").samples


@pytest.mark.parametrize("kind", TEMPLATE_KIND_PARAMS)
def test_templates_for_digits(kind):
    templates = get_templates("digits", kind)
    assert templates and all(t.count("{}") == 1 for t in templates)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="no split 'dev'"):
        build_digits(None, "dev")
    with pytest.raises(ValueError, match="Unknown digits domain 'blurred'"):
        build_digits(None, "test", domain="blurred")
    with pytest.raises(ValueError, match="not a digits sample path"):
        parse_digit_path("/data/img.jpg")
    assert parse_digit_path("digits/edges/17") == ("edges", 17)
