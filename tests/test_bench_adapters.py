"""Smoke test of the training-step benchmark (kr_vlm.benchmarks.adapters, run by scripts/bench_adapters.py) on
the tiny CLIP, so the benchmark cannot rot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from kr_vlm.adapters import KRAdapterLinear
from kr_vlm.benchmarks import adapters
from kr_vlm.models.targets import clip_target_modules

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_adapters.py"


@pytest.fixture(scope="module")
def bench():
    return adapters


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("bench_adapters", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_steps_every_method_on_the_tiny_clip(bench, tiny_clip):
    batch = bench.make_batch(tiny_clip, batch_size=2, device=torch.device("cpu"))
    runs = bench.run_benchmark(
        tiny_clip, list(bench.METHODS), bench.TARGET_SETS["mlp"], batch, steps=1, warmup=1
    )
    rows = bench.summarize(runs)
    by_method = {row["method"]: row for row in rows}
    assert set(by_method) == set(bench.METHODS)
    assert by_method["frozen"]["trainable_params"] == by_method["floor"]["trainable_params"] == 0
    assert by_method["kradapter"]["trainable_params"] == by_method["authors"]["trainable_params"] > 0
    for row in rows:
        assert row["step_time_ms"] > 0 and row["peak_memory_mb"] > 0
    assert by_method["lora"]["time_vs_lora"] == by_method["floor"]["time_vs_floor"] == 1.0
    assert "kradapter" in bench.markdown_table(rows)
    assert bench.kr_vs_lora(rows).startswith("KRAdapter / LoRA")
    # Trainable tensors moved (the optimizer stepped) in every adapted model.
    kr_model = next(run.model for run in runs if run.name == "kradapter")
    assert any(
        module.kr_u.abs().sum() > 0 for module in kr_model.modules() if isinstance(module, KRAdapterLinear)
    )


def test_attention_targets_convert_the_attention_first(bench, tiny_clip):
    targets = bench.TARGET_SETS["all"]
    model = bench.convert_for_targets(tiny_clip, targets)
    batch = bench.make_batch(model, batch_size=2, device=torch.device("cpu"))
    runs = bench.run_benchmark(model, ["kradapter", "lora"], targets, batch, steps=1, warmup=0)
    kr_model = runs[0].model
    adapted = [name for name, module in kr_model.named_modules() if isinstance(module, KRAdapterLinear)]
    assert len(adapted) == 2 * 2 * len(targets)  # 2 towers x 2 blocks x 6 linears
    assert all(run.trainable_params > 0 and run.peak_bytes > 0 for run in runs)


def test_the_floor_computes_every_targeted_weight_gradient_and_steps_nothing(bench, tiny_clip):
    run = bench.build_run("floor", tiny_clip, bench.TARGET_SETS["mlp"])
    assert run.optimizer is None and run.trainable_params == 0
    before = {name: parameter.clone() for name, parameter in run.model.named_parameters()}
    bench.train_step(run, bench.make_batch(run.model, batch_size=2, device=torch.device("cpu")))
    targeted = {f"{name}.weight" for name in clip_target_modules(run.model, layers=bench.TARGET_SETS["mlp"])}
    with_grads = {name for name, parameter in run.model.named_parameters() if parameter.grad is not None}
    assert with_grads == targeted
    assert all(torch.equal(parameter, before[name]) for name, parameter in run.model.named_parameters())


def test_every_method_steps_a_tiny_llama(bench):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = bench.build_llama(
        torch.device("cpu"),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
    )
    batch = bench.make_llama_batch(model, batch_size=2, device=torch.device("cpu"))
    targets = bench.LLAMA.target_sets["all"]
    runs = bench.run_benchmark(
        model, list(bench.METHODS), targets, batch, steps=1, warmup=0, workload=bench.LLAMA
    )
    rows = {row["method"]: row for row in bench.summarize(runs)}
    assert set(rows) == set(bench.METHODS)
    assert rows["kradapter"]["trainable_params"] == rows["authors"]["trainable_params"] > 0
    assert all(row["step_time_ms"] > 0 and row["peak_memory_mb"] > 0 for row in rows.values())
    kr_model = next(run.model for run in runs if run.name == "kradapter")
    assert len([m for m in kr_model.modules() if isinstance(m, KRAdapterLinear)]) == 7  # 1 layer x 7 linears


def test_authors_reference_layer_computes_the_same_update(bench):
    torch.manual_seed(0)
    for d_out, d_in in [(20, 7), (7, 20), (16, 16)]:
        base = nn.Linear(d_in, d_out)
        ours, authors = KRAdapterLinear(base), bench.AuthorsKRAdapter(base)
        with torch.no_grad():
            ours.kr_u.normal_()
            authors.kr_u.copy_(ours.kr_u)
            authors.kr_v.copy_(ours.kr_v)
        x = torch.randn(3, d_in)
        torch.testing.assert_close(authors(x), ours(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(authors.transposed_update().T * authors.scaling, ours.delta_weight())


def test_main_rejects_too_few_steps(script):
    with pytest.raises(SystemExit):
        script.main(["--steps", "2"])


@pytest.mark.slow
def test_compiled_runs_are_timed_beside_the_eager_ones(bench, tiny_clip):
    torch._dynamo.reset()
    batch = bench.make_batch(tiny_clip, batch_size=2, device=torch.device("cpu"))
    runs = bench.run_benchmark(
        tiny_clip,
        ["kradapter", "lora"],
        bench.TARGET_SETS["mlp"],
        batch,
        steps=1,
        warmup=1,
        compiled_methods=["kradapter", "lora"],
        compile_backend="aot_eager",
    )
    rows = bench.summarize(runs)
    assert [row["method"] for row in rows] == ["kradapter", "lora", "kradapter (compiled)", "lora (compiled)"]
    assert all(row["step_time_ms"] > 0 and row["peak_memory_mb"] > 0 for row in rows)
    line = bench.compiled_vs_eager(rows)
    assert line.startswith("torch.compile") and "kradapter " in line and "lora " in line
    torch._dynamo.reset()
