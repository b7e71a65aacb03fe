"""The adapter library on Hugging Face models, as their users work with them: tiny Llama and GPT-2 models
built from transformers configs (random weights), peft's own classes to check against, stock transformers
to load the merged models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from hf_models import tiny_llama as llama
from kr_vlm.adapters import (
    AdapterConfig,
    adapted_layers,
    disabled_adapters,
    inject_adapters,
    load_adapters,
    merge_adapters,
    merge_and_unload,
    print_trainable_parameters,
    save_adapters,
)
from kr_vlm.adapters.methods.peft import PEFT_TYPES

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PEFT_METHODS = list(PEFT_TYPES)
# Small options for each peft method on these models.
PEFT_OPTIONS = {
    "lora": {"r": 2, "lora_alpha": 4},
    "dora": {"r": 2, "lora_alpha": 4},
    "vera": {"r": 4},
    "lokr": {"r": 2},
    "loha": {"r": 2},
    "randlora": {"r": 4},
}
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_fc", "mlp.c_proj"]  # Conv1D layers, square and both rectangular ways


def gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))


def move_trainable(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Move the adapter tensors away from their (often zero-update) initialisation, as training would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens()).logits


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- a merged model is a stock model


def test_merged_llama_loads_in_stock_transformers_in_a_fresh_process(tmp_path):
    model = move_trainable(inject_adapters(llama(), AdapterConfig("kradapter", "all-linear")))
    adapted_logits = logits(model)
    merge_and_unload(model)
    assert {type(module) for name, module in model.named_modules() if name.endswith("_proj")} == {
        torch.nn.Linear
    }
    model.save_pretrained(tmp_path / "merged")
    torch.save({"tokens": tokens(), "logits": adapted_logits}, tmp_path / "expected.pt")

    # Only transformers is imported: no kr_vlm, no peft.
    check = f"""
import json, sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r}).eval()
expected = torch.load({str(tmp_path / "expected.pt")!r})
with torch.no_grad():
    difference = (model(expected["tokens"]).logits - expected["logits"]).abs().max().item()
print(json.dumps({{"difference": difference, "kr_vlm": "kr_vlm" in sys.modules, "peft": "peft" in sys.modules}}))
"""
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["kr_vlm"] is False and report["peft"] is False
    assert report["difference"] <= 1e-5, report


# ---------------------------------------------------------------- peft's format, both ways


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_peft_reads_the_folders_kr_vlm_writes(method, tmp_path):
    model = move_trainable(
        inject_adapters(llama(), AdapterConfig(method, LLAMA_TARGETS, **PEFT_OPTIONS[method]))
    )
    expected = logits(model)
    save_adapters(model, tmp_path / "kr_vlm")

    peft_model = peft.PeftModel.from_pretrained(llama(), tmp_path / "kr_vlm")
    assert max_difference(logits(peft_model), expected) == 0.0

    # The files are the ones peft writes for the same adapter.
    peft_model.save_pretrained(tmp_path / "peft")
    ours, theirs = (load_file(tmp_path / side / "adapter_model.safetensors") for side in ("kr_vlm", "peft"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    config, peft_config = (
        json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("kr_vlm", "peft")
    )
    bookkeeping = {"auto_mapping", "base_model_name_or_path", "peft_version"}
    assert {k: v for k, v in config.items() if k not in bookkeeping} == {
        k: v for k, v in peft_config.items() if k not in bookkeeping
    }


def test_transformers_load_adapter_reads_a_kr_vlm_lora_folder(tmp_path):
    model = move_trainable(inject_adapters(llama(), AdapterConfig("lora", LLAMA_TARGETS, r=2)))
    save_adapters(model, tmp_path)
    base = llama()
    base.load_adapter(str(tmp_path))
    assert max_difference(logits(base), logits(model)) == 0.0


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_load_adapters_reads_the_folders_peft_writes(method, tmp_path):
    config = peft.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPES[method]](
        target_modules=LLAMA_TARGETS,
        **PEFT_OPTIONS[method],
        **({"use_dora": True} if method == "dora" else {}),
    )
    peft_model = move_trainable(peft.get_peft_model(llama(), config))
    peft_model.save_pretrained(tmp_path)

    model = load_adapters(llama(), tmp_path)
    assert model.kr_vlm_adapter_config == AdapterConfig(method, sorted(LLAMA_TARGETS), **PEFT_OPTIONS[method])
    assert len(list(adapted_layers(model))) == 6
    assert max_difference(logits(model), logits(peft_model)) == 0.0


def test_peft_settings_kr_vlm_cannot_rebuild_are_an_error(tmp_path):
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0])
    peft.get_peft_model(llama(), config).save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"settings kr_vlm cannot rebuild: layers_to_transform=\[0\].*PeftModel"
    ):
        load_adapters(llama(), tmp_path)


@pytest.mark.parametrize("method", ["kradapter", "full"])
def test_peft_reading_a_kr_vlm_folder_says_what_it_is(method, tmp_path):
    save_adapters(inject_adapters(llama(), AdapterConfig(method, ["q_proj"])), tmp_path)
    for read in (
        lambda: peft.PeftModel.from_pretrained(llama(), tmp_path),
        lambda: llama().load_adapter(str(tmp_path)),
    ):
        with pytest.raises(
            KeyError, match=f"{method} adapter saved by kr_vlm.*kr_vlm.adapters.load_adapters"
        ):
            read()


# ---------------------------------------------------------------- GPT-2: transformers' Conv1D


def base_weights_shaped_out_in(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each adapted layer's ``base_weight()``, checked to be ``W0`` as ``(out, in)`` although Conv1D stores it
    ``(in, out)``."""
    weights = {}
    for name, layer in adapted_layers(model):
        weights[name] = layer.base_weight().detach().clone()
        torch.testing.assert_close(weights[name], layer.base_layer.weight.T, rtol=0, atol=0)
    return weights


def test_gpt2_trains_merges_and_round_trips_with_kradapter(tmp_path):
    model = inject_adapters(gpt2(), AdapterConfig("kradapter", "all-linear"))
    from transformers.pytorch_utils import Conv1D as conv1d

    assert (
        len(list(adapted_layers(model))) == 8
    )  # c_attn, attn.c_proj, c_fc, mlp.c_proj of 2 blocks (no lm_head)
    assert all(isinstance(layer.base_layer, conv1d) for _, layer in adapted_layers(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(10):
        loss = model(tokens(), labels=tokens()).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    model.eval()
    trained = logits(model)

    save_adapters(model, tmp_path / "adapters")
    assert max_difference(logits(load_adapters(gpt2(), tmp_path / "adapters")), trained) == 0.0
    base_weights = base_weights_shaped_out_in(model)
    merge_adapters(model)
    for name, layer in adapted_layers(model):  # W0 still, while merged
        torch.testing.assert_close(layer.base_weight(), base_weights[name], rtol=1e-5, atol=1e-5)
    merge_and_unload(model)
    assert {
        type(module) for name, module in model.named_modules() if name.endswith(("c_attn", "c_fc", "c_proj"))
    } == {conv1d}
    assert max_difference(logits(model), trained) <= 1e-5
    model.save_pretrained(tmp_path / "merged")
    assert (
        max_difference(logits(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged")), trained)
        <= 1e-5
    )


@pytest.mark.parametrize("method", [method for method in PEFT_METHODS if method not in ("lokr", "loha")])
def test_gpt2_with_peft_methods(method, tmp_path):
    model = move_trainable(
        inject_adapters(gpt2(), AdapterConfig(method, GPT2_TARGETS, **PEFT_OPTIONS[method]))
    )
    expected = logits(model)
    for name, layer in adapted_layers(model):  # the update, shaped (out, in), is what the layer adds
        module, x = model.get_submodule(name), torch.randn(3, layer.in_features)
        assert layer.delta_weight().shape == (layer.out_features, layer.in_features)
        torch.testing.assert_close(
            module(x) - layer.base_layer(x), x @ layer.delta_weight().T, rtol=1e-4, atol=1e-5
        )
    save_adapters(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert max_difference(logits(peft.PeftModel.from_pretrained(gpt2(), tmp_path)), expected) == 0.0
    assert max_difference(logits(load_adapters(gpt2(), tmp_path)), expected) == 0.0
    base_weights = base_weights_shaped_out_in(model)
    merge_adapters(model)  # peft's merge (RandLoRA's scaling of 160 makes its rounding the largest)
    assert max_difference(logits(model), expected) <= 1e-4
    for name, layer in adapted_layers(model):  # W0 still, while merged
        torch.testing.assert_close(layer.base_weight(), base_weights[name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["lokr", "loha", "full"])
def test_methods_without_conv1d_say_so(method):
    model = gpt2()
    with pytest.raises(
        ValueError, match=f"Method '{method}' adapts nn.Linear layers only.*c_attn.*kradapter, lora"
    ):
        inject_adapters(model, AdapterConfig(method, ["c_attn"]))
    assert all(parameter.requires_grad for parameter in model.parameters())


# ---------------------------------------------------------------- tied embeddings, all-linear, switching


@pytest.mark.parametrize(
    ("build", "embedding"),
    [
        (lambda: llama(tie_word_embeddings=True), "model.embed_tokens.weight"),
        (gpt2, "transformer.wte.weight"),
    ],
)
def test_a_tied_lm_head_is_refused_by_kradapter(build, embedding):
    model = build()
    with pytest.raises(
        ValueError, match=f"lm_head shares its weight with {embedding}.*allow_shared_weights=True"
    ):
        inject_adapters(model, AdapterConfig("kradapter", ["lm_head"]))
    assert all(parameter.requires_grad for parameter in model.parameters())
    inject_adapters(model, AdapterConfig("kradapter", ["lm_head"], allow_shared_weights=True))
    move_trainable(model)
    with pytest.raises(RuntimeError, match=f"lm_head shares its weight with {embedding}"):
        merge_and_unload(model)


@pytest.mark.parametrize("build", [llama, gpt2])
def test_all_linear_selects_what_peft_selects(build):
    ours = inject_adapters(build(), AdapterConfig("lora", "all-linear", r=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's fan_in_fan_out notes for GPT-2
        theirs = peft.get_peft_model(build(), peft.LoraConfig(r=2, target_modules="all-linear"))
    peft_layers = {
        name.removeprefix("base_model.model.")
        for name, module in theirs.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    assert {name for name, _ in adapted_layers(ours)} == peft_layers
    assert "lm_head" not in peft_layers


def test_print_trainable_parameters_matches_peft(capsys):
    print_trainable_parameters(inject_adapters(llama(), AdapterConfig("lora", LLAMA_TARGETS, r=2)))
    ours = capsys.readouterr().out
    peft.get_peft_model(
        llama(), peft.LoraConfig(r=2, target_modules=LLAMA_TARGETS)
    ).print_trainable_parameters()
    assert ours == capsys.readouterr().out


def test_disabled_adapters_gives_the_base_llama():
    base_logits = logits(llama())
    model = move_trainable(inject_adapters(llama(), AdapterConfig("kradapter", "all-linear", dropout=0.1)))
    adapted_logits = logits(model)
    with disabled_adapters(model):
        assert max_difference(logits(model), base_logits) == 0.0
        generated = model.generate(tokens()[:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)
    assert (
        max_difference(logits(model), adapted_logits) == 0.0
        and max_difference(adapted_logits, base_logits) > 0
    )


# ---------------------------------------------------------------- the Trainer example


@pytest.mark.slow
def test_the_trainer_example_trains_saves_resumes_and_exports(tmp_path):
    script = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "hf_trainer_kradapter.py")

    def run(output: str, *arguments: str) -> subprocess.CompletedProcess:
        command = [sys.executable, script, "--output-dir", str(tmp_path / output), *arguments]
        return subprocess.run(command, capture_output=True, text=True, check=True)

    whole_run = run("whole", "--max-steps", "6", "--save-steps", "3")
    if not torch.cuda.is_available():  # a CPU user sees no warning about pinning memory
        assert "pin_memory" not in whole_run.stderr
    # the same run stopped after 3 steps, then resumed from its checkpoint
    run("resumed", "--max-steps", "3", "--save-steps", "3")
    resumed = run("resumed", "--max-steps", "6", "--save-steps", "3")
    assert "resuming from" in resumed.stdout and "checkpoint-3" in resumed.stdout

    for run_folder in ("whole", "resumed"):
        checkpoint = tmp_path / run_folder / "checkpoint-6"
        assert (checkpoint / "adapter_config.json").is_file()
        assert not (checkpoint / "model.safetensors").exists()  # adapter-only checkpoints
    whole, resumed_weights = (
        load_file(tmp_path / run_folder / "checkpoint-6" / "adapter_model.safetensors")
        for run_folder in ("whole", "resumed")
    )
    assert whole.keys() == resumed_weights.keys()
    for key in whole:
        torch.testing.assert_close(resumed_weights[key], whole[key], rtol=1e-5, atol=1e-6)

    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "merged")
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
