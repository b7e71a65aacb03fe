"""``kr_vlm.adapters.register_method``: the checked way to add a method, and the README's example of it.

The README's "Adding a method" block is copied verbatim into a fresh file and run as the command line
(the demo with the rank monitor on); the run must then appear in the dashboard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import kr_vlm.adapters
from compose_helpers import compose_config
from kr_vlm.adapters import (
    AdapterConfig,
    AdapterLayer,
    MethodRegistrationError,
    adapted_layers,
    inject_adapters,
    register_method,
)
from kr_vlm.adapters.methods import REGISTRY
from kr_vlm.errors import ConfigError, KrVlmError

REPO = Path(__file__).resolve().parents[1]
README_MARKER = "<!-- readme-example: adding-a-method"


pytestmark = pytest.mark.usefixtures("registry_restored")


@dataclasses.dataclass
class ShiftOptions:
    scale: float = 0.1


class ShiftLinear(AdapterLayer):
    """ΔW = scale * outer(u, 1): the base class gives everything else."""

    def __init__(self, base: nn.Module, scale: float = 0.1) -> None:
        super().__init__(base)
        self.scale = scale
        self.u = nn.Parameter(torch.zeros(self.out_features))

    def update(self) -> torch.Tensor:
        return self.scale * self.u[:, None].expand(self.out_features, self.in_features)


def tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_a_registered_method_is_live_everywhere_at_once():
    assert "shift" not in kr_vlm.adapters.METHODS
    method = register_method("shift", ShiftLinear, ShiftOptions)
    assert REGISTRY["shift"] is method and method.layer is ShiftLinear
    from kr_vlm.adapters import METHODS  # read after registering: never a snapshot taken at import

    assert METHODS[-1] == "shift" and kr_vlm.adapters.config.METHODS == METHODS
    model = inject_adapters(tiny(), AdapterConfig("shift", ["0", "2"], scale=0.5))
    layers = dict(adapted_layers(model))
    assert list(layers) == ["0", "2"] and all(isinstance(layer, ShiftLinear) for layer in layers.values())
    assert layers["0"].scale == 0.5 and layers["0"].rank_cap == 5
    with pytest.raises(ConfigError, match="Unknown option 'scal' for method 'shift'. Valid options: scale"):
        AdapterConfig("shift", ["0"], scal=1.0)


def test_the_defaults_of_the_base_class_are_the_layer_s_update():
    register_method("shift", ShiftLinear, ShiftOptions)
    model = inject_adapters(tiny(), AdapterConfig("shift", ["0"]))
    layer = model[0]
    with torch.no_grad():
        layer.u.normal_()
    x = torch.randn(4, 6)
    base = layer.base_layer.weight.detach().clone()
    expected = x @ (base + layer.update()).T + layer.base_layer.bias
    torch.testing.assert_close(layer(x), expected)
    layer.set_update_scale(0.5)
    torch.testing.assert_close(layer.delta_weight(), 0.5 * layer.update())
    torch.testing.assert_close(layer.spectral_factors().matrix, layer.delta_weight().detach())
    halfway = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), halfway)
    torch.testing.assert_close(layer.base_weight(), base)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, base)
    assert set(layer.adapter_state_dict()) == {"u"}
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["0.u"]


def test_a_layer_class_that_lacks_protocol_methods_is_refused_by_name():
    class Incomplete(nn.Module):
        def delta_weight(self) -> torch.Tensor: ...

        def merge(self) -> None: ...

    with pytest.raises(MethodRegistrationError, match="Incomplete does not answer .*AdaptedLayer.*lacks base_weight, "
                       "spectral_factors, unmerge, adapter_state_dict, set_update_scale"):
        register_method("incomplete", Incomplete)
    assert "incomplete" not in REGISTRY


def test_an_adapter_layer_without_its_update_is_refused():
    class NoUpdate(AdapterLayer):
        pass

    with pytest.raises(MethodRegistrationError, match=r"NoUpdate does not answer .*lacks update\(\)"):
        register_method("no_update", NoUpdate)


def test_names_options_and_duplicates_are_checked():
    with pytest.raises(MethodRegistrationError, match="lower case letters"):
        register_method("Rank-One", ShiftLinear, ShiftOptions)
    with pytest.raises(MethodRegistrationError, match="a method of that name is registered already"):
        register_method("lora", ShiftLinear, ShiftOptions)

    @dataclasses.dataclass
    class NoDefault:
        scale: float

    with pytest.raises(MethodRegistrationError, match="every option needs a default.*NoDefault has none for scale"):
        register_method("shift", ShiftLinear, NoDefault)
    with pytest.raises(MethodRegistrationError, match="options must be a dataclass"):
        register_method("shift", ShiftLinear, dict)
    assert "shift" not in REGISTRY
    register_method("shift", ShiftLinear, ShiftOptions)
    register_method("shift", ShiftLinear, ShiftOptions, replace=True)


def test_a_layer_without_its_data_members_is_refused_at_injection_and_the_model_is_kept():
    class NoRankCap(ShiftLinear):
        rank_cap = property(lambda self: self.missing)  # hasattr is False: the member is not there

    register_method("no_cap", NoRankCap, ShiftOptions)
    model = tiny()
    with pytest.raises(ConfigError, match="Method 'no_cap' made a layer at 0 .NoRankCap.*lacks rank_cap"):
        inject_adapters(model, AdapterConfig("no_cap", ["0"]))
    assert type(model[0]) is nn.Linear and all(p.requires_grad for p in model.parameters())


def test_the_hydra_schema_is_stored_when_the_method_is_registered(tmp_path):
    register_method("shift_cli", ShiftLinear, ShiftOptions)
    cfg = compose_config(tmp_path, ["experiment=demo", "adapter=shift_cli", "adapter.options.scale=0.5"])
    assert cfg.model.adapter.method == "shift_cli" and cfg.model.adapter.options.scale == 0.5
    with pytest.raises(Exception, match=r"adapter\.options\.scal"):
        compose_config(tmp_path, ["experiment=demo", "adapter=shift_cli", "adapter.options.scal=0.5"])
    with pytest.raises(Exception, match="scale"):
        compose_config(tmp_path, ["experiment=demo", "adapter=shift_cli", "adapter.options.scale=big"])


def _register_peft(name: str, config_class: str, **options) -> None:
    import peft

    from kr_vlm.adapters.methods.peft_layer import PeftLayerView, find_peft_layer

    def inject(model, names, _options):
        config = getattr(peft, config_class)(target_modules=list(names), **options)
        peft.inject_adapter_in_model(config, model)

    register_method(name, PeftLayerView, inject=inject, find=find_peft_layer)


@pytest.mark.parametrize(
    ("name", "config_class", "options"),
    [("boft", "BOFTConfig", {"boft_block_size": 1}), ("oft", "OFTConfig", {"r": 1, "oft_block_size": 0})],
)
def test_peft_methods_that_are_not_additive_are_refused_at_injection(name, config_class, options):
    _register_peft(name, config_class, **options)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(ConfigError, match=f"Method '{name}' cannot adapt 0: peft's {name} layer .* is not added "
                       "to the base weight"):
        inject_adapters(model, AdapterConfig(name, ["0", "2"]))
    assert [type(module) for module in model] == [nn.Linear, nn.ReLU, nn.Linear]


def test_entry_points_of_installed_packages_register_their_methods_for_the_command_line(tmp_path):
    (tmp_path / "my_methods.py").write_text(
        "from torch import nn\n"
        "from kr_vlm.adapters import AdapterLayer, register_method\n"
        "class Zero(AdapterLayer):\n"
        "    def update(self):\n"
        "        return self.base_layer.weight.new_zeros(self.out_features, self.in_features)\n"
        "register_method('plugin_zero', Zero)\n"
    )
    info = tmp_path / "my_methods-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-methods\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kr_vlm.methods]\nplugin_zero = my_methods\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    code = "import kr_vlm.cli; from kr_vlm.adapters import METHODS; print(METHODS[-1])"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "plugin_zero"


def test_an_entry_point_that_fails_to_load_is_named(monkeypatch):
    from importlib.metadata import EntryPoint

    from kr_vlm.adapters import registry

    broken = EntryPoint("broken", "no_such_module_here", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [broken])
    with pytest.raises(KrVlmError, match="entry point 'broken' .no_such_module_here. failed to load"):
        registry.load_method_plugins()


def readme_example() -> str:
    """The README's "Adding a method" code block, found by its marker."""
    text = (REPO / "README.md").read_text()
    assert README_MARKER in text, "the README lost its 'Adding a method' example marker"
    block = re.search(r"```python\n(.*?)```", text[text.index(README_MARKER) :], re.S)
    return block.group(1)


@pytest.mark.slow
def test_the_readme_example_registers_trains_with_the_rank_monitor_and_shows_in_the_dashboard(tmp_path):
    script = tmp_path / "rank_one.py"
    script.write_text(readme_example())
    paths = [
        f"paths.{key}={tmp_path / folder}"
        for key, folder in (("root_dir", ""), ("data_dir", "data"), ("log_dir", "logs"))
    ]
    run_dir = tmp_path / "run"
    command = [
        sys.executable, str(script), "experiment=demo", "adapter=rank_one", "adapter.options.scaling=0.5",
        "data=digits", "data.shots=1", "trainer.max_steps=4", "callbacks.rank_monitor.every_n_steps=2",
        "zero_shot_baseline=false", *paths, f"paths.output_dir={run_dir}",
    ]  # fmt: skip
    trained = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    history = json.loads((run_dir / "rank_history.json").read_text())
    assert history["steps"] == [0, 2, 4]
    assert {info["rank_cap"] for info in history["layers"].values()} == {1}
    final_ranks = [values["effective_rank"][-1] for values in history["groups"].values()]
    assert final_ranks and all(rank == pytest.approx(1.0, abs=1e-3) for rank in final_ranks)
    assert (run_dir / "rank_report.html").is_file() and (run_dir / "adapters").is_dir()

    shown = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "rank_dashboard.py"), str(run_dir), "-o", str(tmp_path / "dash")],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("1 runs: rank_one")
    assert "rank_one" in (tmp_path / "dash" / "rank_dashboard_runs.csv").read_text()


@pytest.mark.parametrize("name", [name for name, method in REGISTRY.items() if method.adapts_layers])
def test_every_built_in_method_passes_the_registration_checks(name):
    from kr_vlm.adapters.registry import _check_layer_class, _check_options

    method = REGISTRY[name]
    _check_layer_class(name, method.layer)
    _check_options(name, method.options)
