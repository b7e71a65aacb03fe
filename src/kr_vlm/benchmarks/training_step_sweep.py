"""Measuring the training-step benchmark (``kr_vlm.benchmarks.training_step``): every method at every precision and
batch size, one model at a time, in interleaved rounds; and its tables.

For each sweep point (a precision and a batch size) the methods take turns in rounds. In every round each
method's model is built afresh from the base model (a deep copy, adapted, with a new AdamW), warmed up
(``warmup`` untimed steps: lazy initialisation, optimizer state), timed over ``steps`` steps and freed before
the next method is built, so the process holds the base model and one method's model at most. Rebuilding
costs a copy and the warm-up each round; in return every method is timed close in time to the others in each
round (the slow drifts of a shared machine hit them alike), and no method runs beside another's model, its
memory or its cache footprint. The order of the methods rotates from round to round.

Step time = median over rounds of the round's median step (wall clock). "x floor" and "x LoRA" = median over
rounds of (this method's step / the floor's or LoRA's step in the same round). On the CPU the process's CPU
time (user + system, all threads) is measured beside it: it leaves out the time other processes held the
cores, so its ratios move less when the machine is shared.

Peak memory (MB, 2**20 bytes) = the most bytes of tensors alive at once for this model during one training
step, measured in the first round after the timed steps: its parameters and buffers, its optimizer state,
and the peak of everything the step allocates (activations kept for backward, transient tensors, gradients).
On CUDA the step part comes from the caching allocator (``max_memory_allocated`` minus what was allocated
before the step, with the peak reset); on CPU, which has no allocator statistics, from the allocation and
free events the PyTorch profiler records during one more, untimed step (the running maximum of allocated
minus freed bytes). The inputs and the base model the runs are copied from are not counted.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kr_vlm import table_text
from kr_vlm.benchmarks.training_step import (
    CLIP,
    COMPILED_SUFFIX,
    Batch,
    MethodRun,
    Workload,
    build_run,
    synchronize,
    train_step,
)

# The bar for KRAdapter: step time within 1.1x of its floor, peak memory at most LoRA's.
TIME_BAR_VS_FLOOR = 1.1
MEMORY_BAR_VS_LORA = 1.0


@dataclass
class Measurement:
    """One method at one sweep point: per round, the median of its timed steps (wall and CPU ms)."""

    method: str
    trainable_params: int
    step_ms: list[float]
    cpu_ms: list[float]
    peak_bytes: int


def _resident_bytes(run: MethodRun) -> int:
    """Parameters, buffers and optimizer state of this run: what it holds between steps (grads are freed)."""
    tensors = list(run.model.parameters()) + list(run.model.buffers())
    if run.optimizer is not None:
        tensors += [
            value
            for state in run.optimizer.state.values()
            for value in state.values()
            if torch.is_tensor(value)
        ]
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}
    return sum(storages.values())


def _cpu_step_peak_bytes(run: MethodRun, batch: Batch) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(run, batch)
    # Every CPU allocation (+bytes) and free (-bytes) in the step, in time order.
    events = [
        event
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    allocated = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        allocated += event.nbytes()
        peak = max(peak, allocated)
    return peak


def _cuda_step_peak_bytes(run: MethodRun, batch: Batch) -> int:
    device = batch[0].device
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    train_step(run, batch)
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def peak_memory_bytes(run: MethodRun, batch: Batch) -> int:
    """Peak bytes of this run's tensors during one training step (see the module docstring)."""
    run.model.zero_grad(set_to_none=True)  # gradients of the previous step are not part of this one
    if batch[0].device.type == "cuda":
        step_peak = _cuda_step_peak_bytes(run, batch)
    else:
        step_peak = _cpu_step_peak_bytes(run, batch)
    return _resident_bytes(run) + step_peak


def _timed_steps(run: MethodRun, batch: Batch, steps: int) -> tuple[float, float]:
    """Median wall and CPU milliseconds of ``steps`` training steps."""
    device = batch[0].device
    wall, cpu = [], []
    for _ in range(steps):
        synchronize(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        train_step(run, batch)
        synchronize(device)
        wall.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - cpu_started) * 1000)
    return statistics.median(wall), statistics.median(cpu)


def measure(
    base_model: nn.Module,
    methods: Sequence[str],
    targets: Sequence[str],
    batch: Batch,
    precision: str = "fp32",
    rounds: int = 3,
    steps: int = 1,
    warmup: int = 1,
    workload: Workload = CLIP,
    compiled_methods: Sequence[str] = (),
    compile_backend: str = "inductor",
    progress: Callable[[str], None] = lambda line: None,
) -> list[Measurement]:
    """Time every method (and a compiled run of each of ``compiled_methods``) at one precision and batch: in
    each of ``rounds`` rounds, in rotating order, build its model from ``base_model``, take ``warmup`` steps,
    time ``steps`` steps, measure the peak memory (first round only) and free it; ``progress`` gets a line a
    method and round."""
    if rounds < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"Need rounds >= 1, steps >= 1, warmup >= 0; got {rounds}, {steps}, {warmup}.")
    entries = [(name, None) for name in methods] + [(name, compile_backend) for name in compiled_methods]
    results: dict[str, Measurement] = {}
    for round_index in range(rounds):
        shift = round_index % len(entries)
        for name, backend in entries[shift:] + entries[:shift]:
            run = build_run(name, base_model, targets, workload, backend, precision)
            for _ in range(warmup):
                train_step(run, batch)
            step_ms, cpu_ms = _timed_steps(run, batch, steps)
            record = results.get(run.name)
            if record is None:
                peak = peak_memory_bytes(run, batch)
                record = results[run.name] = Measurement(run.name, run.trainable_params, [], [], peak)
            record.step_ms.append(step_ms)
            record.cpu_ms.append(cpu_ms)
            progress(
                f"round {round_index + 1}/{rounds}  {run.name:<22} {step_ms:9.1f} ms a step "
                f"(CPU {cpu_ms:.1f} ms), peak {record.peak_bytes / 2**20:.0f} MB"
            )
            del run
            gc.collect()  # the next model is built only once this one is gone
    return [results[name + (COMPILED_SUFFIX if backend else "")] for name, backend in entries]


def paired_ratio(values: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of this method's value / the reference method's value in the same round."""
    return statistics.median(value / ref for value, ref in zip(values, reference, strict=True))


def summarize(measurements: Sequence[Measurement], on_cpu: bool) -> list[dict]:
    """One dict per method: trainable params, median step (and CPU) time, peak memory, and the paired ratios
    to LoRA and to the floor (NaN where that method was not measured). CPU times only ``on_cpu``."""
    by_method = {record.method: record for record in measurements}
    lora, floor = by_method.get("lora"), by_method.get("floor")
    rows = []
    for record in measurements:
        row = {
            "method": record.method,
            "trainable_params": record.trainable_params,
            "step_time_ms": statistics.median(record.step_ms),
            "step_times_ms": list(record.step_ms),
            "peak_memory_mb": record.peak_bytes / 2**20,
            "time_vs_lora": math.nan if lora is None else paired_ratio(record.step_ms, lora.step_ms),
            "time_vs_floor": math.nan if floor is None else paired_ratio(record.step_ms, floor.step_ms),
            "memory_vs_lora": math.nan if lora is None else record.peak_bytes / lora.peak_bytes,
        }
        if on_cpu:
            row["cpu_time_ms"] = statistics.median(record.cpu_ms)
            row["cpu_times_ms"] = list(record.cpu_ms)
            row["cpu_vs_floor"] = math.nan if floor is None else paired_ratio(record.cpu_ms, floor.cpu_ms)
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    """The rows of one sweep point as a Markdown table (CPU time columns when measured)."""
    cpu = "cpu_time_ms" in rows[0]
    header = ["method", "trainable params", "step time (ms)", *(["CPU time (ms)"] if cpu else [])]
    header += ["peak memory (MB)", "time / floor", *(["CPU time / floor"] if cpu else [])]
    header += ["time / LoRA", "memory / LoRA"]
    cells = []
    for row in rows:
        line = [row["method"], f"{row['trainable_params']:,}", f"{row['step_time_ms']:.1f}"]
        line += [f"{row['cpu_time_ms']:.1f}"] if cpu else []
        line += [f"{row['peak_memory_mb']:.1f}", f"{row['time_vs_floor']:.2f}"]
        line += [f"{row['cpu_vs_floor']:.2f}"] if cpu else []
        line += [f"{row['time_vs_lora']:.2f}", f"{row['memory_vs_lora']:.2f}"]
        cells.append(line)
    return table_text.markdown_table(header, cells, ["left"] + ["right"] * (len(header) - 1))


def kradapter_verdict(rows: Sequence[dict]) -> str | None:
    """One line: KRAdapter's step time against its floor and its peak memory against LoRA's, with the bars."""
    kr = next((row for row in rows if row["method"] == "kradapter"), None)
    if kr is None or (math.isnan(kr["time_vs_floor"]) and math.isnan(kr["memory_vs_lora"])):
        return None

    def verdict(ratio: float, bar: float) -> str:
        return f"{ratio:.2f}x (bar <= {bar}x: {'met' if ratio <= bar else 'MISSED'})"

    parts = []
    if not math.isnan(kr["time_vs_floor"]):
        cpu = f", CPU time {kr['cpu_vs_floor']:.2f}x" if "cpu_vs_floor" in kr else ""
        parts.append(f"KRAdapter / floor: step time {verdict(kr['time_vs_floor'], TIME_BAR_VS_FLOOR)}{cpu}")
    if not math.isnan(kr["memory_vs_lora"]):
        parts.append(f"KRAdapter / LoRA: peak memory {verdict(kr['memory_vs_lora'], MEMORY_BAR_VS_LORA)}")
    return "; ".join(parts)


def compiled_vs_eager(rows: Sequence[dict]) -> str | None:
    """One line: each compiled run's step time relative to the same method run eagerly."""
    by_method = {row["method"]: row for row in rows}
    ratios = [
        f"{row['method'].removesuffix(COMPILED_SUFFIX)} "
        f"{paired_ratio(row['step_times_ms'], by_method[eager]['step_times_ms']):.2f}x"
        for row in rows
        if row["method"].endswith(COMPILED_SUFFIX)
        and (eager := row["method"].removesuffix(COMPILED_SUFFIX)) in by_method
    ]
    return f"torch.compile, step time compiled / eager: {', '.join(ratios)}" if ratios else None


def sweep_summary(points: Sequence[dict]) -> str:
    """KRAdapter x floor and x LoRA at every sweep point, as one Markdown table (``points``: dicts with
    ``precision``, ``batch_size`` and ``rows``)."""
    header = ["precision", "batch", "KRAdapter step (ms)", "x floor", "CPU x floor", "x LoRA", "memory x LoRA"]
    rows = []
    for point in points:
        kr = next((row for row in point["rows"] if row["method"] == "kradapter"), None)
        if kr is None:
            continue
        cpu = f"{kr['cpu_vs_floor']:.2f}" if "cpu_vs_floor" in kr else "-"
        rows.append(
            [point["precision"], point["batch_size"], f"{kr['step_time_ms']:.1f}", f"{kr['time_vs_floor']:.2f}"]
            + [cpu, f"{kr['time_vs_lora']:.2f}", f"{kr['memory_vs_lora']:.2f}"]
        )
    return table_text.markdown_table(header, rows, ["left"] + ["right"] * (len(header) - 1))


def sweep_verdict(points: Sequence[dict]) -> str | None:
    """One line for a whole sweep: KRAdapter / floor at every point and the most KRAdapter / LoRA memory,
    against the bars (``points`` as for ``sweep_summary``)."""
    found = [
        (point, row)
        for point in points
        for row in point["rows"]
        if row["method"] == "kradapter" and not math.isnan(row["time_vs_floor"])
    ]
    if not found:
        return None
    times = ", ".join(
        f"{point['precision']} b{point['batch_size']} {row['time_vs_floor']:.2f}x" for point, row in found
    )
    met = sum(row["time_vs_floor"] <= TIME_BAR_VS_FLOOR for _, row in found)
    line = f"KRAdapter at every point, step time / floor: {times} ({met} of {len(found)} within {TIME_BAR_VS_FLOOR}x)"
    memory = [row["memory_vs_lora"] for _, row in found if not math.isnan(row["memory_vs_lora"])]
    if memory:
        line += f"; peak memory / LoRA at most {max(memory):.2f}x (bar {MEMORY_BAR_VS_LORA}x: "
        line += f"{'met' if max(memory) <= MEMORY_BAR_VS_LORA else 'MISSED'})"
    return line
