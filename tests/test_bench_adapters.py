"""The training-step benchmark (kr_vlm.benchmarks.training_step and training_step_sweep, run by scripts/bench_adapters.py)
on the tiny CLIP: what each row trains, how the sweep measures (one model alive at a time, rounds, paired
ratios), and the script's output."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from kr_vlm.adapters import KRAdapterLinear
from kr_vlm.benchmarks import training_step, training_step_sweep
from kr_vlm.models.targets import clip_target_modules

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_adapters.py"
CPU = torch.device("cpu")


@pytest.fixture
def script(monkeypatch, tiny_clip):
    """scripts/bench_adapters.py as a module, building the tiny CLIP instead of ViT-B-16."""
    spec = importlib.util.spec_from_file_location("bench_adapters_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "build_base_model", lambda targets, device: tiny_clip)
    return module


def test_every_method_steps_the_tiny_clip_and_moves_its_trainable_tensors(tiny_clip):
    batch = training_step.make_batch(tiny_clip, batch_size=2, device=CPU)
    for name in training_step.METHOD_BUILDERS:
        run = training_step.build_run(name, tiny_clip, training_step.TARGET_SETS["mlp"])
        before = {key: value.clone() for key, value in run.model.named_parameters() if value.requires_grad}
        training_step.train_step(run, batch)
        after = dict(run.model.named_parameters())
        if name in ("frozen", "floor"):
            assert run.trainable_params == 0 and run.optimizer is None
            assert all(torch.equal(after[key], value) for key, value in before.items())
        else:
            assert run.trainable_params == sum(value.numel() for value in before.values()) > 0
            assert any(not torch.equal(after[key], value) for key, value in before.items()), name


def test_the_floor_computes_every_targeted_weight_gradient_and_steps_nothing(tiny_clip):
    for precision in training_step.PRECISIONS:
        run = training_step.build_run(
            "floor", tiny_clip, training_step.TARGET_SETS["mlp"], precision=precision
        )
        assert run.optimizer is None and run.trainable_params == 0
        before = {name: parameter.clone() for name, parameter in run.model.named_parameters()}
        training_step.train_step(run, training_step.make_batch(run.model, batch_size=2, device=CPU))
        targeted = {
            f"{name}.weight"
            for name in clip_target_modules(run.model, layers=training_step.TARGET_SETS["mlp"])
        }
        with_grads = {name for name, parameter in run.model.named_parameters() if parameter.grad is not None}
        assert with_grads == targeted
        # The dense gradient itself (nonzero, full shape), not a placeholder.
        assert all(run.model.get_parameter(name).grad.abs().sum() > 0 for name in targeted)
        assert all(torch.equal(parameter, before[name]) for name, parameter in run.model.named_parameters())


def test_bf16_runs_the_forward_under_autocast_and_backward_outside_it(tiny_clip):
    seen = {}
    run = training_step.build_run("kradapter", tiny_clip, training_step.TARGET_SETS["mlp"], precision="bf16")
    layer = next(module for module in run.model.modules() if isinstance(module, KRAdapterLinear))

    def forward_hook(module, inputs, output):
        seen["forward"] = output.dtype
        output.register_hook(lambda grad: seen.update(backward_autocast=torch.is_autocast_enabled("cpu")))

    layer.register_forward_hook(forward_hook)
    training_step.train_step(run, training_step.make_batch(run.model, batch_size=2, device=CPU))
    assert seen == {"forward": torch.bfloat16, "backward_autocast": False}
    fp32_run = training_step.build_run("kradapter", tiny_clip, training_step.TARGET_SETS["mlp"])
    next(m for m in fp32_run.model.modules() if isinstance(m, KRAdapterLinear)).register_forward_hook(
        forward_hook
    )
    training_step.train_step(fp32_run, training_step.make_batch(fp32_run.model, batch_size=2, device=CPU))
    assert seen["forward"] == torch.float32


def test_the_sweep_keeps_one_model_alive_at_a_time(tiny_clip, monkeypatch):
    built = []

    def tracking_build_run(*args, **kwargs):
        assert all(model() is None for model in built), "a previous method's model is still alive"
        run = training_step.build_run(*args, **kwargs)
        built.append(weakref.ref(run.model))
        return run

    monkeypatch.setattr(training_step_sweep, "build_run", tracking_build_run)
    methods = ["kradapter", "lora"]
    batch = training_step.make_batch(tiny_clip, batch_size=2, device=CPU)
    measurements = training_step_sweep.measure(tiny_clip, methods, ["fc1"], batch, rounds=2, warmup=0)
    assert len(built) == 2 * len(methods)  # rebuilt every round
    gc.collect()
    assert all(model() is None for model in built)
    assert [record.method for record in measurements] == methods
    assert all(len(record.step_ms) == len(record.cpu_ms) == 2 for record in measurements)


def test_the_order_of_the_methods_rotates_between_rounds(tiny_clip, monkeypatch):
    order = []
    real_build_run = training_step_sweep.build_run
    # Only the order is looked at here: no steps.
    monkeypatch.setattr(training_step_sweep, "train_step", lambda run, batch: None)
    monkeypatch.setattr(training_step_sweep, "peak_memory_bytes", lambda run, batch: 1)
    monkeypatch.setattr(
        training_step_sweep,
        "build_run",
        lambda name, *args, **kwargs: order.append(name) or real_build_run(name, *args, **kwargs),
    )
    batch = training_step.make_batch(tiny_clip, batch_size=2, device=CPU)
    training_step_sweep.measure(tiny_clip, ["kradapter", "lora", "floor"], ["fc1"], batch, rounds=3, warmup=0)
    assert order == ["kradapter", "lora", "floor", "lora", "floor", "kradapter", "floor", "kradapter", "lora"]


def test_ratios_pair_each_round_with_the_same_round_of_the_reference():
    # Per-round ratios 2, 3 and 0.5: their median is 2, while the ratio of the medians would be 1.
    assert training_step_sweep.paired_ratio([2.0, 9.0, 3.0], [1.0, 3.0, 6.0]) == 2.0
    records = [
        training_step_sweep.Measurement("kradapter", 10, [2.0, 9.0, 3.0], [2.0, 9.0, 3.0], 3 * 2**20),
        training_step_sweep.Measurement("lora", 10, [4.0, 9.0, 3.0], [1.0, 1.0, 1.0], 4 * 2**20),
        training_step_sweep.Measurement("floor", 0, [1.0, 3.0, 6.0], [1.0, 3.0, 6.0], 2**20),
    ]
    kr, lora, floor = training_step_sweep.summarize(records, on_cpu=True)
    assert (kr["time_vs_floor"], kr["cpu_vs_floor"], kr["step_time_ms"]) == (2.0, 2.0, 3.0)
    assert kr["time_vs_lora"] == 1.0 and kr["memory_vs_lora"] == 0.75
    assert "cpu_time_ms" not in training_step_sweep.summarize(records, on_cpu=False)[0]
    verdict = training_step_sweep.kradapter_verdict([kr, lora, floor])
    assert verdict == (
        "KRAdapter / floor: step time 2.00x (bar <= 1.1x: MISSED), CPU time 2.00x; "
        "KRAdapter / LoRA: peak memory 0.75x (bar <= 1.0x: met)"
    )


def test_peak_memory_grows_with_the_batch_and_counts_the_optimizer_state(tiny_clip):
    targets = training_step.TARGET_SETS["mlp"]
    small, large = (
        training_step_sweep.measure(
            tiny_clip,
            ["kradapter", "floor"],
            targets,
            training_step.make_batch(tiny_clip, size, CPU),
            rounds=1,
        )
        for size in (1, 8)
    )
    assert all(big.peak_bytes > little.peak_bytes for big, little in zip(large, small, strict=True))
    kradapter = training_step.build_run("kradapter", tiny_clip, targets)
    training_step.train_step(kradapter, training_step.make_batch(tiny_clip, 1, CPU))
    resident = training_step_sweep._resident_bytes(kradapter)
    model_bytes = sum(p.numel() * p.element_size() for p in kradapter.model.parameters())
    model_bytes += sum(b.numel() * b.element_size() for b in kradapter.model.buffers())
    assert resident == model_bytes + 2 * 4 * kradapter.trainable_params + 4 * len(kradapter.optimizer.state)


def test_the_script_sweeps_batch_sizes_and_precisions_and_writes_the_docs_page(script, tmp_path, capsys):
    markdown, json_path = tmp_path / "bench.md", tmp_path / "bench.json"
    argv = [
        "--batch-sizes",
        "1",
        "2",
        "--precision",
        "fp32",
        "bf16",
        "--methods",
        "kradapter",
        "floor",
        "--rounds",
        "1",
        "--warmup",
        "0",
    ]
    argv += ["--markdown", str(markdown), "--json", str(json_path)]
    report = script.main(argv)

    points = [(point["precision"], point["batch_size"]) for point in report["points"]]
    assert points == [("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)]
    for point in report["points"]:
        assert [row["method"] for row in point["rows"]] == ["kradapter", "floor"]
        assert all(len(row["step_times_ms"]) == 1 for row in point["rows"])
        assert point["verdict"].startswith("KRAdapter / floor: step time")
    printed = capsys.readouterr()
    assert printed.err.count("round 1/1") == 4 * 2  # a progress line a point, round and method
    assert "### bf16, batch 2" in printed.out and "### KRAdapter at every point" in printed.out
    page = markdown.read_text()
    assert f"`python scripts/bench_adapters.py {' '.join(argv)}`" in page
    assert "load average (1, 5, 15 min) at the start" in page and "## fp32, batch 1" in page
    assert page.count("| kradapter |") == 4 and "| bf16 | 2 |" in page
    assert json.loads(json_path.read_text())["points"][3]["batch_size"] == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rounds", "0"], "--rounds and --steps must be at least 1"),
        (["--warmup", "-1"], "--warmup at least 0"),
        (["--batch-sizes", "0"], "--batch-sizes must be positive"),
        (["--precision", "fp16"], "invalid choice: 'fp16'"),
    ],
)
def test_the_script_rejects_bad_settings_with_a_message(script, argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        script.parse_args(argv)
    assert error.value.code == 2 and message in capsys.readouterr().err


def test_attention_targets_convert_the_attention_first(tiny_clip):
    targets = training_step.TARGET_SETS["all"]
    model = training_step.convert_for_targets(tiny_clip, targets)
    run = training_step.build_run("kradapter", model, targets)
    adapted = [name for name, module in run.model.named_modules() if isinstance(module, KRAdapterLinear)]
    assert len(adapted) == 2 * 2 * len(targets)  # 2 towers x 2 blocks x 6 linears
    training_step.train_step(run, training_step.make_batch(model, batch_size=2, device=CPU))


def test_every_method_steps_a_tiny_llama():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = training_step.build_llama(
        CPU,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
    )
    batch = training_step.make_llama_batch(model, batch_size=2, device=CPU)
    targets = training_step.LLAMA.target_sets["all"]
    records = training_step_sweep.measure(
        model,
        list(training_step.METHOD_BUILDERS),
        targets,
        batch,
        rounds=1,
        warmup=0,
        workload=training_step.LLAMA,
    )
    rows = {row["method"]: row for row in training_step_sweep.summarize(records, on_cpu=True)}
    assert set(rows) == set(training_step.METHOD_BUILDERS)
    assert rows["kradapter"]["trainable_params"] == rows["authors"]["trainable_params"] > 0
    run = training_step.build_run("kradapter", model, targets, training_step.LLAMA)
    assert len([m for m in run.model.modules() if isinstance(m, KRAdapterLinear)]) == 7  # 1 layer x 7 linears


def test_authors_reference_layer_computes_the_same_update():
    torch.manual_seed(0)
    for d_out, d_in in [(20, 7), (7, 20), (16, 16)]:
        base = nn.Linear(d_in, d_out)
        ours, authors = KRAdapterLinear(base), training_step.AuthorsKRAdapter(base)
        with torch.no_grad():
            ours.kr_u.normal_()
            authors.kr_u.copy_(ours.kr_u)
            authors.kr_v.copy_(ours.kr_v)
        x = torch.randn(3, d_in)
        torch.testing.assert_close(authors(x), ours(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(authors.transposed_update().T * authors.scaling, ours.delta_weight())


@pytest.mark.slow
def test_compiled_runs_are_timed_beside_the_eager_ones(tiny_clip):
    torch._dynamo.reset()
    batch = training_step.make_batch(tiny_clip, batch_size=2, device=CPU)
    records = training_step_sweep.measure(
        tiny_clip,
        ["kradapter", "lora"],
        training_step.TARGET_SETS["mlp"],
        batch,
        rounds=2,
        compiled_methods=["kradapter", "lora"],
        compile_backend="aot_eager",
    )
    rows = training_step_sweep.summarize(records, on_cpu=True)
    assert [row["method"] for row in rows] == ["kradapter", "lora", "kradapter (compiled)", "lora (compiled)"]
    line = training_step_sweep.compiled_vs_eager(rows)
    assert line.startswith("torch.compile") and "kradapter " in line and "lora " in line
    torch._dynamo.reset()


@pytest.mark.slow
def test_the_script_runs_as_a_command(tmp_path):
    pytest.importorskip("transformers")
    command = [sys.executable, str(SCRIPT), "--model", "llama-tiny", "--methods", "kradapter", "floor"]
    command += ["--batch-sizes", "1", "--rounds", "1", "--warmup", "0", "--threads", "1"]
    command += ["--markdown", str(tmp_path / "bench.md")]
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "| kradapter |" in result.stdout and "KRAdapter / floor: step time" in result.stdout
    assert "[fp32, batch 1] round 1/1  kradapter" in result.stderr
    assert (tmp_path / "bench.md").read_text().startswith("# Training step")
