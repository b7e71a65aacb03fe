"""Update scaling (WiSE-FT in adapter space): ``W0 + α ΔW`` for every registered method, exact at α = 0
(the base model) and α = 1 (the trained model); merging, the merged state dict and saving with α."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kr_vlm.adapters import (
    MethodRegistrationError,
    adapted_layers,
    load_adapters,
    merge_adapters,
    merge_and_unload,
    merged_state_dict,
    register_method,
    save_adapters,
    scaled_adapters,
    set_adapter_scale,
    unmerge_adapters,
)
from kr_vlm.adapters.methods import REGISTRY
from test_adapters import ScaledLinear, ScaleOptions, adapted, build_model, inputs

# Every registered method that adapts layers (test_adapters.adapted moves all their tensors off init, so
# DoRA's magnitude and VeRA's scales move too).
SCALABLE = [name for name, method in REGISTRY.items() if method.adapts_layers]


def scales(model: nn.Module) -> set[float]:
    return {layer.update_scale for _, layer in adapted_layers(model)}


@pytest.mark.parametrize("method", SCALABLE)
def test_scale_zero_is_the_base_model_and_one_the_trained_model(method):
    x = inputs()
    base_output = build_model()(x)
    model = adapted(method)
    trained_output = model(x)
    assert not torch.equal(trained_output, base_output)
    set_adapter_scale(model, 0)
    assert torch.equal(model(x), base_output)
    set_adapter_scale(model, 0.5)
    set_adapter_scale(model, 1)
    assert torch.equal(model(x), trained_output)
    with scaled_adapters(model, 0):
        assert torch.equal(model(x), base_output)
    assert scales(model) == {1.0} and torch.equal(model(x), trained_output)


@pytest.mark.parametrize("method", SCALABLE)
def test_a_scale_between_interpolates_the_weights(method):
    """At α the layer computes W0 + α ΔW (DoRA's ΔW is its whole update W_dora - W0), and delta_weight()
    reports α ΔW."""
    model = adapted(method)
    updates = {name: layer.delta_weight().detach().clone() for name, layer in adapted_layers(model)}
    x = torch.randn(7, 24, generator=torch.Generator().manual_seed(5))
    with scaled_adapters(model, 0.3):
        for name, layer in adapted_layers(model):
            torch.testing.assert_close(layer.delta_weight(), 0.3 * updates[name], rtol=1e-5, atol=1e-7)
            module = getattr(layer, "module", layer)
            x_in = x[:, : layer.in_features]
            bias = layer.base_layer.bias if layer.base_layer is not module else module.initial_bias
            if method == "full" and module.bias is not None:
                bias = bias + 0.3 * (module.bias - module.initial_bias)
            expected = nn.functional.linear(x_in, layer.base_weight() + 0.3 * updates[name], bias)
            torch.testing.assert_close(module(x_in), expected, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", SCALABLE)
def test_merging_honours_the_scale_and_saving_keeps_the_trained_tensors(method, tmp_path):
    x = inputs()
    model = adapted(method)
    trained_output = model(x)
    set_adapter_scale(model, 0.5)
    half = model(x)
    originals = {name: layer.base_weight().detach().clone() for name, layer in adapted_layers(model)}

    plain = build_model()
    plain.load_state_dict(merged_state_dict(model), strict=True)
    torch.testing.assert_close(plain(x), half, rtol=1e-5, atol=1e-5)
    assert torch.equal(model(x), half)  # merged_state_dict left the model as it was

    merge_adapters(model)
    torch.testing.assert_close(model(x), half, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge_adapters"):
        set_adapter_scale(model, 1)
    assert scales(model) == {0.5}
    save_adapters(model, tmp_path / "saved")  # α is never saved, merged or not
    unmerge_adapters(model)
    for name, layer in adapted_layers(model):
        torch.testing.assert_close(layer.base_weight(), originals[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), half, rtol=1e-5, atol=1e-5)
    set_adapter_scale(model, 1)
    torch.testing.assert_close(model(x), trained_output, rtol=1e-5, atol=1e-6)

    reloaded = load_adapters(build_model(), tmp_path / "saved")
    assert scales(reloaded) == {1.0}
    assert torch.equal(reloaded(x), trained_output)

    set_adapter_scale(model, 0.5)
    torch.testing.assert_close(merge_and_unload(model)(x), half, rtol=1e-5, atol=1e-5)


def test_scales_are_checked_and_put_back_after_an_error():
    model = adapted("kradapter")
    for bad in (float("nan"), float("inf"), "0.5", True, None):
        with pytest.raises(ValueError, match="finite number"):
            set_adapter_scale(model, bad)
    assert scales(model) == {1.0}
    with pytest.raises(KeyError), scaled_adapters(model, 0.25):
        assert scales(model) == {0.25}
        raise KeyError
    assert scales(model) == {1.0}
    with pytest.raises(ValueError, match="no adapters"):
        set_adapter_scale(build_model(), 0.5)


def test_a_method_whose_layers_cannot_scale_is_refused_when_it_is_registered():
    class Unscalable(ScaledLinear):
        set_update_scale = None

    with pytest.raises(MethodRegistrationError, match="Unscalable .*lacks set_update_scale"):
        register_method("unscalable", Unscalable, ScaleOptions)
    assert "unscalable" not in REGISTRY
