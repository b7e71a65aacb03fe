"""Step time and peak memory of one training step: KRAdapter against its floor and every other method.

One training step = forward, loss, backward, AdamW step of a model with random weights (nothing downloaded):

- ``clip`` (default): open_clip ``ViT-B-16``, both towers, a batch of 224 px images and tokenized captions,
  CLIP's contrastive loss;
- ``llama-tiny``: a small ``transformers`` Llama (``LLAMA_TINY``: 2 decoder layers of width 1024) on random
  token ids, its causal language-model loss; needs the ``hf`` extra.

Methods (``METHOD_BUILDERS``; the options are chosen for comparable budgets, about KRAdapter's trainable parameters per
layer, except VeRA whose update has only ``r + d_out`` trainable numbers by construction):

- ``kradapter``: ``KRAdapterLinear`` (one matmul with the fused weight, backward recomputes it).
- ``lora`` (r=32), ``dora`` (r=32), ``vera`` (r=256), ``lokr`` (r=128, decompose_factor=4), ``loha``
  (r=16), ``randlora`` (r=8): peft's layers through ``kr_vlm.adapters.inject_adapters``.
- ``full``: the targeted linears' own weights train (``AdapterConfig("full")``; its layers also keep a
  frozen copy of the initial weight to report ``delta_weight()``, which shows in the memory column).
- ``frozen``: nothing trains, but gradients still flow to the output of the input embeddings (patch and
  token embeddings), so backward runs through the whole model: the floor every adapter pays.
- ``floor``: ``frozen`` plus the dense weight gradient ``grad_yᵀ x`` of every targeted linear, with no
  optimizer state: KRAdapter's factor gradients are contracted from exactly that matrix, so this is the
  least a KRAdapter step can cost.
- ``authors``: the layer of the authors' README, as a reference: on every call it rebuilds ``ΔW`` and adds
  a second matmul ``x @ ΔWᵀ`` under plain autograd.

Targets (``--targets``): ``mlp`` = the MLP linears of every block (CLIP's ``fc1 fc2``, Llama's ``gate up
down``); ``all`` adds the attention projections (``q k v o``; CLIP's attention is converted to separate
linears first, ``kr_vlm.models.convert_attention``). Adding a method or a target set is one line in
``METHOD_BUILDERS`` or a workload's ``target_sets``.

``kr_vlm.benchmarks.training_step_sweep`` measures them (step time and peak memory, one model at a time, in
interleaved rounds) and ``scripts/bench_adapters.py`` runs it from the command line;
``scripts/bench_rank_monitor.py`` and ``scripts/bench_data.py`` time the same CLIP training step.

A training step runs the forward pass and the loss under autocast when the run's precision is ``bf16`` (as
Lightning's ``bf16-mixed`` does: autocast entered for each step's forward, the backward and the optimizer
step outside it), in float32 otherwise.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import open_clip
import torch
from torch import nn

from kr_vlm.adapters import AdapterConfig, inject_adapters, kradapter_shapes
from kr_vlm.models import clip_target_modules, convert_attention
from kr_vlm.models.targets import clip_image_size, clip_input_modules

Batch = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Workload:
    """What a benchmark trains: a model family's target layers, input embeddings and loss.

    ``target_sets`` maps ``--targets`` choices to layer kinds; ``target_names(model, kinds)`` gives the module
    names of those linears; ``input_modules(model)`` the input embeddings whose outputs require grad in the
    ``frozen`` and ``floor`` rows; ``loss(model, batch)`` the training loss.
    """

    name: str
    target_sets: dict[str, tuple[str, ...]]
    target_names: Callable[[nn.Module, Sequence[str]], list[str]]
    input_modules: Callable[[nn.Module], list[nn.Module]]
    loss: Callable[[nn.Module, Batch], torch.Tensor]


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
_CLIP_LOSS = open_clip.ClipLoss()


def _clip_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    images, tokens = batch
    image_features, text_features, logit_scale = model(images, tokens)[:3]
    return _CLIP_LOSS(image_features, text_features, logit_scale)


CLIP = Workload(
    name=MODEL_NAME,
    target_sets=TARGET_SETS,
    target_names=lambda model, kinds: clip_target_modules(model, layers=kinds),
    input_modules=clip_input_modules,
    loss=_clip_loss,
)

# A Llama small enough for a CPU step of a second or two, at the width of a small LLM's layers.
LLAMA_TINY = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 2,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 4096,
    "max_position_embeddings": 256,
}
LLAMA_SEQUENCE_LENGTH = 64
LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")


def _linears_named(model: nn.Module, kinds: Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules whose last name part is one of ``kinds``."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in kinds
    ]


LLAMA = Workload(
    name="llama-tiny",
    target_sets={"mlp": LLAMA_MLP, "all": (*LLAMA_MLP, "q_proj", "k_proj", "v_proj", "o_proj")},
    target_names=_linears_named,
    input_modules=lambda model: [model.get_input_embeddings()],
    loss=lambda model, batch: model(input_ids=batch[0], labels=batch[0]).loss,
)
WORKLOADS = {"clip": CLIP, "llama-tiny": LLAMA}


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


def _authors_adapters(model: nn.Module, names: Sequence[str]) -> nn.Module:
    model.requires_grad_(False)
    for name in names:
        model.set_submodule(name, AuthorsKRAdapter(model.get_submodule(name)))
    return model


def _adapted(method: str, **options) -> Callable[[nn.Module, Sequence[str]], nn.Module]:
    """A METHOD_BUILDERS entry: ``method`` with ``options`` on the named linears."""
    return lambda model, names: inject_adapters(model, AdapterConfig(method, list(names), **options))


def _frozen(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """Nothing trains (``build_run`` makes the input embeddings' outputs require grad, so backward runs)."""
    return inject_adapters(model, AdapterConfig("none"))


def _frozen_with_weight_gradients(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """Frozen, but every named linear's weight gets its dense gradient (and no optimizer state)."""
    _frozen(model, names)
    for name in names:
        model.get_submodule(name).weight.requires_grad_(True)
    return model


# name -> function(model, target module names) that prepares the model in place and returns it.
METHOD_BUILDERS: dict[str, Callable[[nn.Module, Sequence[str]], nn.Module]] = {
    "kradapter": _adapted("kradapter"),
    "lora": _adapted("lora", r=32, lora_alpha=32),
    "dora": _adapted("dora", r=32, lora_alpha=32),
    "vera": _adapted("vera", r=256),
    "lokr": _adapted("lokr", r=128, alpha=128, decompose_factor=4),
    "loha": _adapted("loha", r=16, alpha=16),
    "randlora": _adapted("randlora", r=8),
    "full": _adapted("full"),
    "frozen": _frozen,
    "floor": _frozen_with_weight_gradients,
    "authors": _authors_adapters,
}
# Methods whose gradients are computed but never applied: no optimizer, no trainable parameters counted.
GRADIENTS_ONLY = ("floor",)
# Methods that ``--compile`` adds a compiled run of.
COMPILED_METHODS = ("kradapter", "lora")
COMPILED_SUFFIX = " (compiled)"


# --precision choices: the dtype the forward pass runs in (None: no autocast, float32 throughout).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class MethodRun:
    """One method's model and optimizer, and the precision its steps run in."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    trainable_params: int
    workload: Workload = CLIP
    precision: str = "fp32"


def _require_grad(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.requires_grad_(True)


def build_run(
    name: str,
    base_model: nn.Module,
    targets: Sequence[str],
    workload: Workload = CLIP,
    compile_backend: str | None = None,
    precision: str = "fp32",
) -> MethodRun:
    """A deep copy of ``base_model`` prepared for method ``name`` on the layer kinds ``targets``, with AdamW
    on its trainable tensors, whose steps run in ``precision`` (a ``PRECISIONS`` key); with
    ``compile_backend``, compiled in place by ``torch.compile`` with that backend (run name
    ``"<name> (compiled)"``)."""
    if name not in METHOD_BUILDERS:
        raise ValueError(f"Unknown method {name!r}; choose from {', '.join(METHOD_BUILDERS)}.")
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}.")
    model = copy.deepcopy(base_model)
    model = METHOD_BUILDERS[name](model, workload.target_names(model, targets)).train()
    if not any(parameter.requires_grad for parameter in model.parameters()) or name in GRADIENTS_ONLY:
        for module in workload.input_modules(model):
            module.register_forward_hook(_require_grad)
    if compile_backend is not None:
        model.compile(backend=compile_backend)
        name += COMPILED_SUFFIX
    trainable = [] if name in GRADIENTS_ONLY else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    return MethodRun(name, model, optimizer, sum(param.numel() for param in trainable), workload, precision)


def make_batch(model: nn.Module, batch_size: int, device: torch.device) -> Batch:
    """Random images at the CLIP model's resolution and tokenized captions (open_clip's shipped tokenizer)."""
    height, width = clip_image_size(model)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, height, width, generator=generator).to(device)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME, context_length=model.context_length)
    captions = [CAPTIONS[index % len(CAPTIONS)] for index in range(batch_size)]
    return images, tokenizer(captions).to(device)


def make_llama_batch(model: nn.Module, batch_size: int, device: torch.device) -> Batch:
    """Random token ids, ``LLAMA_SEQUENCE_LENGTH`` a row."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, LLAMA_SEQUENCE_LENGTH)
    return (torch.randint(model.config.vocab_size, shape, generator=generator).to(device),)


def train_step(run: MethodRun, batch: Batch) -> float:
    """Forward and loss (under autocast in bf16), backward, optimizer step. Returns the loss."""
    run.model.zero_grad(set_to_none=True)
    dtype = PRECISIONS[run.precision]
    with torch.autocast(batch[0].device.type, dtype=dtype, enabled=dtype is not None):
        loss = run.workload.loss(run.model, batch)
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


def timed_step(run: MethodRun, batch: Batch) -> float:
    """Wall time of one training step in milliseconds."""
    synchronize(batch[0].device)
    start = time.perf_counter()
    train_step(run, batch)
    synchronize(batch[0].device)
    return (time.perf_counter() - start) * 1000


def convert_for_targets(model: nn.Module, targets: Sequence[str]) -> nn.Module:
    """Give ``model`` separate q/k/v/out linears when ``targets`` name attention projections."""
    if not any(target in ATTENTION_TARGETS for target in targets):
        return model
    return convert_attention(model)


def build_base_model(targets: Sequence[str], device: torch.device, model_name: str = MODEL_NAME) -> nn.Module:
    """A random-init open_clip model (ViT-B-16 unless named; nothing downloaded), converted as ``targets``
    need."""
    return convert_for_targets(open_clip.create_model(model_name, pretrained=None), targets).to(device)


def build_llama(device: torch.device, **config: int) -> nn.Module:
    """A random-init ``transformers`` Llama of ``LLAMA_TINY``'s shape (``config`` overrides it)."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "--model llama-tiny needs transformers: pip install 'kr_vlm[hf]' (or pip install transformers)."
        ) from error
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA_TINY, **config})).to(device)
