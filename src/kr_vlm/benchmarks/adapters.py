"""Step time and peak memory of one CLIP training step: KRAdapter against LoRA and the other baselines.

One training step = forward of both towers of open_clip ``ViT-B-16`` (random init, nothing downloaded) on a
batch of 224 px images and tokenized captions, CLIP's contrastive loss, backward, AdamW step. Methods:

- ``kradapter``: ``KRAdapterLinear`` (one matmul with the fused weight, backward recomputes it).
- ``lora``: peft LoRA, r=32, alpha=32, through ``kr_vlm.adapters.inject_adapters``.
- ``full``: the targeted linears' own weights train (``AdapterConfig("full")``; its layers also keep a
  frozen copy of the initial weight to report ``delta_weight()``, which shows in the memory column).
- ``frozen``: nothing trains, but gradients still flow to the inputs of both towers (the patch embedding
  output and the token embedding output): the floor every adapter pays.
- ``authors``: the layer of the authors' README, as a reference: on every call it rebuilds ``ΔW`` and adds
  a second matmul ``x @ ΔWᵀ`` under plain autograd.

Targets (``--targets``): ``mlp`` = ``fc1`` and ``fc2`` (``mlp.c_fc``, ``mlp.c_proj``) of every block of both
towers; ``all`` adds ``q k v o``, which needs the attention converted to separate linears
(``kr_vlm.models.convert_attention``); ``kr_vlm.models.clip_target_modules`` turns them into module names.
Adding a method or a target set is one line in ``METHODS`` or ``TARGET_SETS``.

``scripts/bench_adapters.py`` runs it from the command line; ``scripts/bench_rank_monitor.py`` and
``scripts/bench_data.py`` time the same training step.

All models are built first, then the methods take steps in turn (round robin), so slow drifts of a shared
machine hit every method alike. Step time = median wall time of the timed steps (after ``--warmup``).
"time / LoRA" = median over rounds of (this method's step time / LoRA's step time in the same round): pairing
steps that ran back to back cancels most of the load changes of a shared machine.

Peak memory (MB, 2**20 bytes) = the most bytes of tensors alive at once for this model during one training
step: its parameters and buffers, its optimizer state, and the peak of everything the step allocates
(activations kept for backward, transient tensors, gradients). On CUDA the step part comes from the caching
allocator (``max_memory_allocated`` minus what was allocated before the step, with the peak reset each
step); on CPU, which has no allocator statistics, it comes from the allocation and free events the PyTorch
profiler records during one extra, untimed step (the running maximum of allocated minus freed bytes). Both
exclude the other methods' models, which live in the same process. The inputs are not counted.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import open_clip
import torch
from torch import nn

from kr_vlm.adapters import AdapterConfig, inject_adapters, kradapter_shapes
from kr_vlm.models import clip_target_modules, convert_attention

MODEL_NAME = "ViT-B-16"
# Layer kinds of kr_vlm.models.targets.LAYER_MODULES; the attention ones need converted attention.
ATTENTION_TARGETS = ("q", "k", "v", "o")
TARGET_SETS: dict[str, tuple[str, ...]] = {
    "mlp": ("fc1", "fc2"),
    "all": ("fc1", "fc2", *ATTENTION_TARGETS),
}
CAPTIONS = (
    "a photo of a dog.",
    "a photo of a cat.",
    "a satellite photo of a river.",
    "a sketch of an aircraft.",
    "a close-up photo of a flower.",
    "a photo of a plate of food.",
    "a blurry photo of a car.",
    "a texture of woven fabric.",
)


class AuthorsKRAdapter(nn.Module):
    """The authors' README layer (reference row): ``base(x) + s * x @ ΔWᵀ`` with ``ΔW`` rebuilt every call.

    Same factors and initialisation as ``KRAdapterLinear`` (``U`` zeros, ``V`` kaiming_uniform with a=5);
    the update is their broadcast product ``(U[:, None, :] * V[:, :, None])`` flattened, transposed when the
    outputs are the larger side, and cut. Plain autograd keeps that dense update for backward.
    """

    def __init__(self, base: nn.Linear, scaling: float = 2.0) -> None:
        super().__init__()
        k, _, rank, rank2 = kradapter_shapes(base.out_features, base.in_features)
        self.base_layer = base.requires_grad_(False)
        self.scaling = scaling
        self.kr_u = nn.Parameter(torch.zeros(k, rank, device=base.weight.device))
        self.kr_v = nn.Parameter(torch.empty(k, rank2, device=base.weight.device))
        nn.init.kaiming_uniform_(self.kr_v, a=5)

    @property
    def weight(self) -> torch.Tensor:
        # open_clip's text tower reads mlp.c_fc.weight.dtype to choose its cast dtype.
        return self.base_layer.weight

    def transposed_update(self) -> torch.Tensor:
        """``ΔWᵀ`` shaped ``(in_features, out_features)``, built as in the authors' ``get_update``."""
        update = (self.kr_u.unsqueeze(1) * self.kr_v.unsqueeze(-1)).view(self.kr_u.shape[0], -1)
        if self.base_layer.out_features > self.base_layer.in_features:
            update = update.T
        return update[: self.base_layer.out_features, : self.base_layer.in_features].T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.transposed_update() * self.scaling + self.base_layer(x)


def _authors_adapters(model: nn.Module, targets: Sequence[str]) -> nn.Module:
    model.requires_grad_(False)
    for name in clip_target_modules(model, layers=targets):
        model.set_submodule(name, AuthorsKRAdapter(model.get_submodule(name)))
    return model


def _adapted(method: str, **options) -> Callable[[nn.Module, Sequence[str]], nn.Module]:
    """A METHODS entry: ``method`` with ``options`` on the layer kinds ``targets`` of both towers."""

    def prepare(model: nn.Module, targets: Sequence[str]) -> nn.Module:
        names = clip_target_modules(model, layers=targets)
        return inject_adapters(model, AdapterConfig(method, names, **options))

    return prepare


def _require_input_grad(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.requires_grad_(True)


def _frozen_with_input_grads(model: nn.Module) -> nn.Module:
    """Nothing trains; the outputs of both towers' input embeddings require grad, so backward still runs."""
    inject_adapters(model, AdapterConfig("none"))
    model.visual.conv1.register_forward_hook(_require_input_grad)
    model.token_embedding.register_forward_hook(_require_input_grad)
    return model


# name -> function(model, layer kinds) that prepares the model in place and returns it.
METHODS: dict[str, Callable[[nn.Module, Sequence[str]], nn.Module]] = {
    "kradapter": _adapted("kradapter"),
    "lora": _adapted("lora", r=32, lora_alpha=32),
    "full": _adapted("full"),
    "frozen": lambda model, targets: _frozen_with_input_grads(model),
    "authors": _authors_adapters,
}


@dataclass
class MethodRun:
    """One method's model, optimizer and measurements."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    trainable_params: int
    step_times_ms: list[float] = field(default_factory=list)
    peak_bytes: int | None = None


def build_run(name: str, base_model: nn.Module, targets: Sequence[str]) -> MethodRun:
    """A deep copy of ``base_model`` prepared for method ``name``, with AdamW on its trainable tensors."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose from {', '.join(METHODS)}.")
    model = METHODS[name](copy.deepcopy(base_model), targets).train()
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    return MethodRun(name, model, optimizer, sum(param.numel() for param in trainable))


def make_batch(model: nn.Module, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images at the model's resolution and tokenized captions (open_clip's shipped tokenizer)."""
    height, width = model.visual.image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, height, width, generator=generator).to(device)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME, context_length=model.context_length)
    captions = [CAPTIONS[index % len(CAPTIONS)] for index in range(batch_size)]
    return images, tokenizer(captions).to(device)


def train_step(run: MethodRun, images: torch.Tensor, tokens: torch.Tensor, loss_fn: nn.Module) -> float:
    """Forward, contrastive loss, backward, optimizer step. Returns the loss."""
    if run.optimizer is not None:
        run.optimizer.zero_grad(set_to_none=True)
    image_features, text_features, logit_scale = run.model(images, tokens)[:3]
    loss = loss_fn(image_features, text_features, logit_scale)
    loss.backward()
    if run.optimizer is not None:
        run.optimizer.step()
    return loss.item()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so wall times measure it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_description(device: torch.device) -> str:
    """The GPU's name, or the CPU and torch's thread count, for the benchmarks' headers."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def timed_step(run: MethodRun, images: torch.Tensor, tokens: torch.Tensor, loss_fn: nn.Module) -> float:
    """Wall time of one training step in milliseconds."""
    synchronize(images.device)
    start = time.perf_counter()
    train_step(run, images, tokens, loss_fn)
    synchronize(images.device)
    return (time.perf_counter() - start) * 1000


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


def _cpu_step_peak_bytes(
    run: MethodRun, images: torch.Tensor, tokens: torch.Tensor, loss_fn: nn.Module
) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(run, images, tokens, loss_fn)
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


def _cuda_step_peak_bytes(
    run: MethodRun, images: torch.Tensor, tokens: torch.Tensor, loss_fn: nn.Module
) -> int:
    device = images.device
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    train_step(run, images, tokens, loss_fn)
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def peak_memory_bytes(run: MethodRun, images: torch.Tensor, tokens: torch.Tensor, loss_fn: nn.Module) -> int:
    """Peak bytes of this run's tensors during one training step (see the module docstring)."""
    if run.optimizer is not None:  # gradients of the previous step are not part of this one
        run.optimizer.zero_grad(set_to_none=True)
    if images.device.type == "cuda":
        step_peak = _cuda_step_peak_bytes(run, images, tokens, loss_fn)
    else:
        step_peak = _cpu_step_peak_bytes(run, images, tokens, loss_fn)
    return _resident_bytes(run) + step_peak


def run_benchmark(
    base_model: nn.Module,
    methods: Sequence[str],
    targets: Sequence[str],
    images: torch.Tensor,
    tokens: torch.Tensor,
    steps: int,
    warmup: int,
) -> list[MethodRun]:
    """Build every method from ``base_model``, time ``steps`` round-robin steps after ``warmup``, then measure
    each method's peak memory in one more step."""
    runs = [build_run(name, base_model, targets) for name in methods]
    loss_fn = open_clip.ClipLoss()
    for step in range(warmup + steps):
        for run in runs:
            elapsed_ms = timed_step(run, images, tokens, loss_fn)
            if step >= warmup:
                run.step_times_ms.append(elapsed_ms)
    for run in runs:
        run.peak_bytes = peak_memory_bytes(run, images, tokens, loss_fn)
    return runs


def summarize(runs: Sequence[MethodRun]) -> list[dict]:
    """One dict per method: trainable params, median step time, peak memory, and both relative to LoRA."""
    rows = [
        {
            "method": run.name,
            "trainable_params": run.trainable_params,
            "step_time_ms": statistics.median(run.step_times_ms),
            "step_times_ms": list(run.step_times_ms),
            "peak_memory_mb": run.peak_bytes / 2**20,
        }
        for run in runs
    ]
    lora = next((row for row in rows if row["method"] == "lora"), None)
    for row in rows:
        if lora is None:
            row["time_vs_lora"] = row["memory_vs_lora"] = math.nan
            continue
        paired = zip(row["step_times_ms"], lora["step_times_ms"], strict=True)
        row["time_vs_lora"] = statistics.median(time_ms / lora_ms for time_ms, lora_ms in paired)
        row["memory_vs_lora"] = row["peak_memory_mb"] / lora["peak_memory_mb"]
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    lines = [
        "| method | trainable params | step time median (ms) | peak memory (MB) | time / LoRA | memory / LoRA |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['trainable_params']:,} | {row['step_time_ms']:.1f} | "
            f"{row['peak_memory_mb']:.1f} | {row['time_vs_lora']:.2f} | {row['memory_vs_lora']:.2f} |"
        )
    return "\n".join(lines)


def kr_vs_lora(rows: Sequence[dict], time_bar: float = 1.3, memory_bar: float = 1.1) -> str | None:
    """One line: KRAdapter's time and memory relative to LoRA against the acceptance bars."""
    kr = next((row for row in rows if row["method"] == "kradapter"), None)
    if kr is None or math.isnan(kr["time_vs_lora"]):
        return None

    def verdict(ratio: float, bar: float) -> str:
        return f"{ratio:.2f}x (bar <= {bar}x: {'met' if ratio <= bar else 'MISSED'})"

    return (
        f"KRAdapter / LoRA: step time {verdict(kr['time_vs_lora'], time_bar)}, "
        f"peak memory {verdict(kr['memory_vs_lora'], memory_bar)}"
    )


def convert_for_targets(model: nn.Module, targets: Sequence[str]) -> nn.Module:
    """Give ``model`` separate q/k/v/out linears when ``targets`` name attention projections."""
    if not any(target in ATTENTION_TARGETS for target in targets):
        return model
    return convert_attention(model)


def build_base_model(targets: Sequence[str], device: torch.device) -> nn.Module:
    """Random-init open_clip ViT-B-16 (nothing downloaded), converted as ``targets`` need."""
    return convert_for_targets(open_clip.create_model(MODEL_NAME, pretrained=None), targets).to(device)
