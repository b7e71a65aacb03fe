"""Every adapted layer describes its update for ``kr_vlm.spectral``; the spectra equal the SVD of ``delta_weight()``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kr_vlm import spectral
from kr_vlm.adapters import AdapterConfig, adapted_layers, inject_adapters

# (d_out, d_in) by name: square, wide (d_out < d_in), tall, and KRAdapter's ragged tails (r * r2 > K) both ways.
SHAPES = {"square": (12, 12), "wide": (7, 20), "tall": (20, 7), "ragged": (10, 26), "ragged_tall": (26, 10)}

# method -> (options, the description its layers give: the fast path the monitor takes)
VARIANTS = {
    "kradapter": ({}, spectral.KhatriRaoFactors),
    "lora": ({"r": 2, "lora_alpha": 4}, spectral.LowRankFactors),
    "lora-rslora": ({"r": 3, "lora_alpha": 4, "use_rslora": True}, spectral.LowRankFactors),
    "vera": ({"r": 4}, spectral.LowRankFactors),
    "lokr": ({"r": 2}, spectral.KroneckerFactors),
    "lokr-both-decomposed": ({"r": 1, "decompose_both": True}, spectral.KroneckerFactors),
    "dora": ({"r": 2, "lora_alpha": 4}, spectral.DenseUpdate),
    "loha": ({"r": 2}, spectral.DenseUpdate),
    "randlora": ({"r": 4}, spectral.DenseUpdate),
    "full": ({}, spectral.DenseUpdate),
}


class Layers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name, (d_out, d_in) in SHAPES.items():
            self.add_module(name, nn.Linear(d_in, d_out))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_method_gives_its_exact_fast_path(variant):
    options, description = VARIANTS[variant]
    torch.manual_seed(0)
    model = inject_adapters(Layers(), AdapterConfig(variant.split("-")[0], list(SHAPES), **options))
    with torch.no_grad():  # move every update away from its (often zero) start
        scale = 1e-3 if variant == "randlora" else 0.3
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * scale)
    layers = dict(adapted_layers(model))
    assert set(layers) == set(SHAPES)
    for name, layer in layers.items():
        factors = layer.spectral_factors()
        assert type(factors) is description, name
        assert factors.shape == SHAPES[name]
        with torch.no_grad():
            sigma = factors.singular_values()
            expected = torch.linalg.svdvals(layer.delta_weight().double())
        # Exact to 1e-4 of the largest singular value (see tests/test_spectral.py).
        assert sigma.shape == expected.shape
        assert (sigma - expected).abs().max() <= 1e-4 * expected.max(), name
