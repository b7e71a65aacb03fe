"""Shared fixtures: tiny open_clip models built from config dicts (never downloaded)."""

from __future__ import annotations

import copy

import pytest
import torch

# A CLIP small enough for CPU tests. The vocabulary is open_clip's real one (49408 tokens), so the
# tokenizer shipped inside open_clip works with it offline.
TINY_CLIP_CFG: dict = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture
def tiny_clip_cfg() -> dict:
    """A fresh copy of the tiny CLIP architecture (safe to mutate)."""
    return copy.deepcopy(TINY_CLIP_CFG)


@pytest.fixture
def tiny_clip(tiny_clip_cfg):
    """An unconverted open_clip.CLIP with random weights, in eval mode."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(**tiny_clip_cfg)
    return model.eval()


def pytest_addoption(parser):
    parser.addoption(
        "--zoo",
        action="store_true",
        help="also run the tests marked zoo: every open_clip model config at real width (hours)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--zoo"):
        return
    skip = pytest.mark.skip(reason="the whole zoo at real width: run with --zoo")
    for item in items:
        if item.get_closest_marker("zoo") is not None:
            item.add_marker(skip)


@pytest.fixture
def registry_restored():
    """The adapter methods a test registers (``kr_vlm.adapters.register_method``) are gone after it."""
    from kr_vlm.adapters.methods import REGISTRY

    before = dict(REGISTRY)
    yield
    REGISTRY.clear()
    REGISTRY.update(before)
