"""`load_adapters` is all or nothing: adapters that do not fit the model (another shape) raise
`AdapterMismatchError` and leave the model exactly as it was, as injection does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kr_vlm.adapters import AdapterConfig, inject_adapters, load_adapters, save_adapters
from kr_vlm.adapters.io import AdapterMismatchError


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.q_proj(x) + self.v_proj(x))


def snapshot(model: nn.Module) -> tuple[dict, dict, dict]:
    """Everything `load_adapters` could change: tensors, module types by name, requires_grad flags."""
    tensors = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    types = {name: type(module) for name, module in model.named_modules()}
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    return tensors, types, flags


@pytest.mark.parametrize("method", ["kradapter", "lora"])
def test_adapters_of_another_shape_leave_the_model_as_it_was(method, tmp_path):
    torch.manual_seed(0)
    options = {"r": 2} if method == "lora" else {}
    saved = inject_adapters(Block(16), AdapterConfig(method, ["q_proj", "v_proj"], **options))
    save_adapters(saved, tmp_path / method)

    torch.manual_seed(1)
    other = Block(8)
    before = snapshot(other)
    with pytest.raises(AdapterMismatchError, match="with a different shape"):
        load_adapters(other, tmp_path / method)
    after = snapshot(other)
    assert after[1] == before[1]  # no adapted layer left behind
    assert after[2] == before[2]  # nothing frozen
    assert after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][name], tensor) for name, tensor in before[0].items())
    assert not hasattr(other, "kr_vlm_adapter_config")
    # The adapters themselves were fine: they load into the model they were saved from.
    torch.manual_seed(0)
    fits = load_adapters(Block(16), tmp_path / method)
    x = torch.randn(2, 16)
    assert torch.equal(fits(x), saved(x))
