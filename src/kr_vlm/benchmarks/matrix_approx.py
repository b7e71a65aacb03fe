"""The synthetic matrix approximation benchmark of the KRAdapter paper (arXiv 2508.00230).

Every method fits a target matrix ``T`` of shape ``(d_out, d_in)`` from scratch with the update it would
train inside a model: a one-layer model (an ``nn.Linear(d_in, d_out)`` with zero weight) gets the method's
adapter through ``kr_vlm.adapters.inject_adapters``, so the layer's ``delta_weight()`` *is* the fit, and
AdamW minimises ``||delta_weight() - T||_F``. All methods get about the same number of trainable
parameters (the paper's budget ``2 * min * sqrt(max)``, 49,152 at 1024x768).

Follows the authors' ``approximate_weight.py`` (github PaulAlbert31/KRAdapter):

- targets: ``gaussian`` (``randn``), ``sparse`` (``randn`` with 90% of entries dropped), ``whitened``
  (PCA-whitened ``randn``: centre, project on the covariance eigenvectors, divide by ``sqrt(eigenvalue +
  1e-5)``; flat spectrum), ``lowrank`` (``randn`` with the smallest 75% of singular values zeroed),
  ``highfreq`` / ``lowfreq`` (row ``i`` is ``sin(2 pi f_i t + phase_i)`` over ``t = j / d_in`` with ``f_i``
  spread evenly over 1000..10000 resp. 1..100 cycles, a random phase in [0, 1) radians as in their code, plus
  0 to 5 harmonics of random frequency in the same range). At 1000+ cycles over ``d_in`` samples the
  high-frequency rows are aliased, exactly as in the authors' benchmark. ``checkpoint:PATH:KEY`` crops a
  real weight matrix (the paper uses CLIP's attention ``in_proj_weight``) to the size.
- each target is cast to half precision and fitted in float32; AdamW (torch defaults, weight decay 0.01),
  lr 0.1, 300 steps, loss ``||fit - T||_F`` (not squared).
- LoRA's rank is ``budget // (d_out + d_in) + 1`` (28 at 1024x768); the truncated SVD at that rank is the
  best any rank-r update can do (Eckart-Young) and needs no training.
- nuclear error: ``mean |sigma_fit - sigma_T|`` over the sorted singular values; effective rank as in
  ``kr_vlm.spectral``.

Choices of ours (the authors' code is silent or differs):

- Normalisation: every target is scaled to unit RMS entry (``||T||_F = sqrt(d_out * d_in)``, the scale of
  the Gaussian target) before the half cast, so lr 0.1 means the same for every family and absolute
  errors compare across families. For ``sparse`` this replaces the authors' ``F.dropout`` rescaling (which
  would change only the scale). ``whitened`` treats the longer side as the samples, so the spectrum is flat
  whichever side is longer.
- Each method starts from its own initialisation as users get it (LoRA ``B = 0``, KRAdapter ``U = 0``,
  LoKr ``w1 = 0``, LoHa ``w2_b = 0``, VeRA ``lambda_b = 0``, RandLoRA ``lambda = 0``); the authors' benchmark
  instead starts LoRA with both factors random.
- Scalings: KRAdapter keeps its default ``s = 2`` (``s = 1``, the authors' benchmark value, fits the same to
  4 digits); LoRA, LoHa, LoKr and RandLoRA use ``alpha = r``, i.e. scaling 1 (peft's defaults would scale a
  rank-28 LoRA by 8/28; peft's advice for RandLoRA, ``randlora_alpha = 20 r``, makes its fit get worse with
  more steps at lr 0.1); VeRA has no scaling. With Adam a constant scaling mostly changes the effective
  step size.
- Each method's size is the one whose trainable count is closest to the budget (``method_setup``), except
  LoRA (the paper's rank rule) and VeRA: VeRA trains only ``r + d_out`` numbers, so matching the budget
  would take ``r`` of about 48,000 shared random projections (over 80M numbers and ~200 GFLOP a step); its
  rank is capped at ``min(d_out, d_in)``, where its update can already be full rank, and it stays far
  under budget. The printed counts are the real ones (``count_parameters``).
- DoRA is left out: its magnitude vector starts as the row norms of the base weight, which are zero here.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kr_vlm.adapters import AdapterConfig, adapted_layers, inject_adapters, kradapter_shapes
from kr_vlm.adapters.inject import count_parameters
from kr_vlm.files import write_json_atomic
from kr_vlm.spectral import effective_rank_from_singular_values, singular_values
from kr_vlm.table_text import markdown_table

FAMILIES = ("gaussian", "sparse", "whitened", "lowrank", "highfreq", "lowfreq")
CHECKPOINT_PREFIX = "checkpoint:"
METHODS = ("kradapter", "lora", "lokr", "loha", "vera", "randlora", "full", "svd")
METHOD_LABELS = {
    "kradapter": "KRAdapter",
    "lora": "LoRA",
    "lokr": "LoKr",
    "loha": "LoHa",
    "vera": "VeRA",
    "randlora": "RandLoRA",
    "full": "Full FT",
    "svd": "SVD (rank r)",
}
# Errors are also shown as a percentage of this method's, as in the paper's figure.
REFERENCE_METHOD = "lora"

SPARSE_DROP_RATE = 0.9
LOWRANK_KEPT_FRACTION = 0.25
HIGH_FREQUENCIES = (1000.0, 10000.0)
LOW_FREQUENCIES = (1.0, 100.0)
MAX_HARMONICS = 5
WHITENING_EPS = 1e-5

# The name of the adapted layer inside the one-layer model.
LAYER_NAME = "layer"


@dataclasses.dataclass(frozen=True)
class BenchmarkSettings:
    """Size, optimisation and budget of one benchmark run (defaults: the paper's)."""

    d_out: int = 1024
    d_in: int = 768
    steps: int = 300
    lr: float = 0.1
    seed: int = 0
    budget: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.d_out < 2 or self.d_in < 2:
            raise ValueError(f"The matrix size must be at least 2x2, got {self.d_out}x{self.d_in}.")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}.")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget must be a positive number of parameters, got {self.budget}.")

    @property
    def parameter_budget(self) -> int:
        """The given budget, or the paper's ``2 * min * sqrt(max)``."""
        return self.budget if self.budget is not None else default_budget(self.d_out, self.d_in)

    @property
    def lora_rank(self) -> int:
        """LoRA's rank (and the truncated SVD's) under the budget, by the paper's rule."""
        return lora_rank_for_budget(self.d_out, self.d_in, self.parameter_budget)


# --quick: small enough for tests (a second or two a family), large enough for the paper's orderings.
QUICK_SETTINGS = {"d_out": 256, "d_in": 192, "steps": 100}


def default_budget(d_out: int, d_in: int) -> int:
    """The paper's trainable-parameter budget ``int(2 * min * sqrt(max))`` (49,152 at 1024x768)."""
    return int(2 * min(d_out, d_in) * math.sqrt(max(d_out, d_in)))


def lora_rank_for_budget(d_out: int, d_in: int, budget: int) -> int:
    """The authors' LoRA rank ``budget // (d_out + d_in) + 1`` (28 at 1024x768), capped at ``min``."""
    return min(budget // (d_out + d_in) + 1, min(d_out, d_in))


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x768"`` -> ``(1024, 768)`` (``d_out x d_in``)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"A size is written D_OUTxD_IN, e.g. 1024x768; got {text!r}.")
    return int(parts[0]), int(parts[1])


# ----------------------------------------------------------------------------------------------------------
# Targets


def _gaussian(d_out: int, d_in: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)


def _sparse(d_out: int, d_in: int, generator: torch.Generator) -> torch.Tensor:
    values = _gaussian(d_out, d_in, generator)
    kept = torch.rand(d_out, d_in, generator=generator, dtype=torch.float64) >= SPARSE_DROP_RATE
    return values * kept


def _whitened(d_out: int, d_in: int, generator: torch.Generator) -> torch.Tensor:
    # Samples along the longer side: with fewer samples than features the covariance is singular and
    # dividing by sqrt(eigenvalue) would blow up its null space.
    transposed = d_out < d_in
    samples = _gaussian(d_in, d_out, generator) if transposed else _gaussian(d_out, d_in, generator)
    centred = samples - samples.mean(dim=0)
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(centred.T))
    whitened = (centred @ eigenvectors) / torch.sqrt(eigenvalues.clamp_min(0) + WHITENING_EPS)
    return whitened.T if transposed else whitened


def _lowrank(d_out: int, d_in: int, generator: torch.Generator) -> torch.Tensor:
    u, sigma, vh = torch.linalg.svd(_gaussian(d_out, d_in, generator), full_matrices=False)
    sigma[int(len(sigma) * LOWRANK_KEPT_FRACTION) :] = 0
    return (u * sigma) @ vh


def _sinusoids(
    d_out: int, d_in: int, generator: torch.Generator, frequencies: tuple[float, float]
) -> torch.Tensor:
    low, high = frequencies
    time_steps = torch.arange(d_in, dtype=torch.float64) / d_in
    row_frequencies = torch.linspace(low, high, d_out, dtype=torch.float64)
    phases = torch.rand(d_out, 1, generator=generator, dtype=torch.float64)
    rows = torch.sin(2 * math.pi * row_frequencies[:, None] * time_steps + phases)
    harmonic_counts = torch.randint(0, MAX_HARMONICS + 1, (d_out, 1), generator=generator)
    harmonic_frequencies = low + (high - low) * torch.rand(
        d_out, MAX_HARMONICS, generator=generator, dtype=torch.float64
    )
    present = torch.arange(MAX_HARMONICS) < harmonic_counts  # (d_out, MAX_HARMONICS)
    harmonics = torch.sin(2 * math.pi * harmonic_frequencies[:, :, None] * time_steps)
    return rows + (harmonics * present[:, :, None]).sum(dim=1)


_SYNTHETIC_TARGETS: dict[str, Callable[[int, int, torch.Generator], torch.Tensor]] = {
    "gaussian": _gaussian,
    "sparse": _sparse,
    "whitened": _whitened,
    "lowrank": _lowrank,
    "highfreq": lambda d_out, d_in, generator: _sinusoids(d_out, d_in, generator, HIGH_FREQUENCIES),
    "lowfreq": lambda d_out, d_in, generator: _sinusoids(d_out, d_in, generator, LOW_FREQUENCIES),
}


def parse_checkpoint_family(family: str) -> tuple[Path, str]:
    """``"checkpoint:PATH:KEY"`` -> ``(PATH, KEY)``; the key follows the last colon."""
    path, separator, key = family.removeprefix(CHECKPOINT_PREFIX).rpartition(":")
    if not family.startswith(CHECKPOINT_PREFIX) or not separator or not path or not key:
        raise ValueError(
            f"A checkpoint target is written checkpoint:PATH:KEY (e.g. checkpoint:model.pt:"
            f"transformer.resblocks.0.attn.in_proj_weight); got {family!r}."
        )
    return Path(path), key


def _load_state_dict(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict of tensors.")
    # A Lightning checkpoint keeps the model's tensors under "state_dict".
    nested = state.get("state_dict")
    return nested if isinstance(nested, dict) else state


def checkpoint_matrix(family: str, d_out: int, d_in: int) -> torch.Tensor:
    """The weight ``KEY`` of the state dict at ``PATH`` (.pt / .bin / .safetensors), cropped to the size."""
    path, key = parse_checkpoint_family(family)
    state = _load_state_dict(path)
    if key not in state:
        matrices = [f"{name} {tuple(value.shape)}" for name, value in state.items() if _is_matrix(value)]
        raise ValueError(
            f"{str(path)!r} has no tensor {key!r}. Its 2-D tensors: {', '.join(matrices) or 'none'}."
        )
    weight = state[key]
    if not _is_matrix(weight) or weight.shape[0] < d_out or weight.shape[1] < d_in:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(
            f"{key!r} in {str(path)!r} is {shape}; it must be a matrix of at least {d_out}x{d_in} to be "
            "cropped to the benchmark size. Choose a smaller --size or another key."
        )
    return weight[:d_out, :d_in].to(torch.float64)


def _is_matrix(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim == 2


def family_label(family: str) -> str:
    """A short name for tables: the family, or ``checkpoint:<file name>:<key>``."""
    if not family.startswith(CHECKPOINT_PREFIX):
        return family
    path, key = parse_checkpoint_family(family)
    return f"{CHECKPOINT_PREFIX}{path.name}:{key}"


def check_families(families: Sequence[str]) -> None:
    """Raise a clear error for an unknown family name (checkpoint families are checked when loaded)."""
    for family in families:
        if family.startswith(CHECKPOINT_PREFIX):
            parse_checkpoint_family(family)
        elif family not in FAMILIES:
            raise ValueError(
                f"Unknown target family {family!r}. Valid families: {', '.join(FAMILIES)}, "
                "or checkpoint:PATH:KEY for a weight matrix of a saved model."
            )


def make_target(family: str, d_out: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """The ``(d_out, d_in)`` float32 target: unit RMS entry, rounded to half precision (see the module doc).

    The random stream depends on the seed and the family only, so a family's target does not change with
    the other families or methods of a run.
    """
    check_families([family])
    if family.startswith(CHECKPOINT_PREFIX):
        raw = checkpoint_matrix(family, d_out, d_in)
    else:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(family.encode()))
        raw = _SYNTHETIC_TARGETS[family](d_out, d_in, generator)
    rms = raw.square().mean().sqrt()
    if rms == 0:
        raise ValueError(f"The {family_label(family)} target is all zeros; nothing to fit.")
    return (raw / rms).half().float()


# ----------------------------------------------------------------------------------------------------------
# Methods and their sizes


@dataclasses.dataclass(frozen=True)
class MethodSetup:
    """A method with the options that put it closest to the budget, and the trainable count they give."""

    method: str
    options: dict[str, Any]
    expected_parameters: int


def _kradapter_sizes(d_out: int, d_in: int) -> Iterator[tuple[dict[str, Any], int]]:
    for rank in range(1, min(d_out, d_in) + 1):
        k, _, rank, rank2 = kradapter_shapes(d_out, d_in, rank)
        yield {"rank": rank}, k * (rank + rank2)


def _loha_sizes(d_out: int, d_in: int) -> Iterator[tuple[dict[str, Any], int]]:
    for rank in range(1, min(d_out, d_in) + 1):
        yield {"r": rank, "alpha": rank}, 2 * rank * (d_out + d_in)


def _lokr_sizes(d_out: int, d_in: int) -> Iterator[tuple[dict[str, Any], int]]:
    # peft's LoKr: ΔW = kron(w1, w2), w1 (out_l, in_m) dense, w2 (out_k, in_n) dense when
    # r >= max(out_k, in_n) / 2, else w2_a @ w2_b of rank r. decompose_factor sets out_l / in_m.
    from peft.tuners.lokr.layer import factorization

    for factor in range(1, min(d_out, d_in) + 1):
        out_l, out_k = factorization(d_out, factor)
        in_m, in_n = factorization(d_in, factor)
        if (out_l, in_m) != (factor, factor):
            continue  # the factor does not divide both sides; peft would pick another split
        dense_from = math.ceil(max(out_k, in_n) / 2)
        for rank in range(1, dense_from + 1):
            w2 = out_k * in_n if rank >= dense_from else rank * (out_k + in_n)
            yield {"r": rank, "alpha": rank, "decompose_factor": factor}, out_l * in_m + w2


def _randlora_sizes(d_out: int, d_in: int) -> Iterator[tuple[dict[str, Any], int]]:
    small = min(d_out, d_in)
    for rank in range(1, small + 1):
        bases = math.ceil(small / rank)
        yield {"r": rank, "randlora_alpha": rank}, rank * bases + bases * small


def _closest(sizes: Iterator[tuple[dict[str, Any], int]], budget: int) -> tuple[dict[str, Any], int]:
    # Ties go to the smaller count: never more than another candidate that is as close.
    return min(sizes, key=lambda size: (abs(size[1] - budget), size[1]))


def method_setup(method: str, settings: BenchmarkSettings) -> MethodSetup:
    """The options ``method`` runs with under ``settings`` (see the module doc for the rules)."""
    check_methods([method])
    d_out, d_in, budget, seed = settings.d_out, settings.d_in, settings.parameter_budget, settings.seed
    rank = settings.lora_rank
    if method == "lora":
        return MethodSetup(method, {"r": rank, "lora_alpha": rank}, rank * (d_out + d_in))
    if method == "svd":
        return MethodSetup(method, {"rank": rank}, rank * (d_out + d_in))
    if method == "full":
        return MethodSetup(method, {}, d_out * d_in)
    if method == "vera":
        vera_rank = max(1, min(budget - d_out, min(d_out, d_in)))
        return MethodSetup(method, {"r": vera_rank, "projection_prng_key": seed}, vera_rank + d_out)
    sizes = {
        "kradapter": _kradapter_sizes,
        "loha": _loha_sizes,
        "lokr": _lokr_sizes,
        "randlora": _randlora_sizes,
    }
    options, count = _closest(sizes[method](d_out, d_in), budget)
    if method == "randlora":
        options["projection_prng_key"] = seed
    return MethodSetup(method, options, count)


def check_methods(methods: Sequence[str]) -> None:
    """Raise a clear error for an unknown method name."""
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise ValueError(
            f"Unknown method(s) {', '.join(map(repr, unknown))}. Valid methods: {', '.join(METHODS)}."
        )


def one_layer_model(setup: MethodSetup, d_out: int, d_in: int, device: torch.device) -> nn.Module:
    """An ``nn.Linear(d_in, d_out)`` with zero weight, inside a module, with ``setup``'s adapter on it."""
    linear = nn.Linear(d_in, d_out, bias=False, device=device)
    nn.init.zeros_(linear.weight)
    model = nn.Sequential(OrderedDict([(LAYER_NAME, linear)]))
    return inject_adapters(model, AdapterConfig(setup.method, [LAYER_NAME], **setup.options))


def truncated_svd(target: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of ``target`` in Frobenius norm (Eckart-Young)."""
    u, sigma, vh = torch.linalg.svd(target, full_matrices=False)
    return (u[:, :rank] * sigma[:rank]) @ vh[:rank]


def fit_target(
    setup: MethodSetup, target: torch.Tensor, settings: BenchmarkSettings
) -> tuple[torch.Tensor, int, float]:
    """Fit ``target`` with ``setup``'s method; return ``(fit, trainable parameters, seconds)``."""
    device = target.device
    start = time.perf_counter()
    if setup.method == "svd":
        fit, trainable = truncated_svd(target, setup.options["rank"]), setup.expected_parameters
    else:
        torch.manual_seed(settings.seed)  # the adapter's initialisation
        model = one_layer_model(setup, settings.d_out, settings.d_in, device)
        trainable = count_parameters(model)[0]
        [(_, layer)] = list(adapted_layers(model))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
        for _ in range(settings.steps):
            loss = torch.linalg.matrix_norm(layer.delta_weight() - target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            fit = layer.delta_weight().float()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return fit.detach(), trainable, time.perf_counter() - start


def approximation_metrics(
    fit: torch.Tensor, target: torch.Tensor, target_sigma: torch.Tensor
) -> dict[str, float]:
    """Frobenius errors (relative and absolute), nuclear error and the fit's effective rank."""
    error = torch.linalg.matrix_norm(fit - target).item()
    fit_sigma = singular_values(fit)
    return {
        "relative_frobenius_error": error / torch.linalg.matrix_norm(target).item(),
        "frobenius_error": error,
        "nuclear_error": (fit_sigma - target_sigma).abs().mean().item(),
        "effective_rank": effective_rank_from_singular_values(fit_sigma).item(),
    }


def make_targets(families: Sequence[str], settings: BenchmarkSettings) -> dict[str, torch.Tensor]:
    """``{family_label: target}`` on ``settings.device``, all built before any fitting so that a bad family
    (or checkpoint) fails at once."""
    check_families(families)
    device = torch.device(settings.device)
    return {
        family_label(family): make_target(family, settings.d_out, settings.d_in, settings.seed).to(device)
        for family in families
    }


def run_benchmark(
    settings: BenchmarkSettings,
    targets: Mapping[str, torch.Tensor],
    methods: Sequence[str] = METHODS,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fit every target (from ``make_targets``) with every method; return the results as JSON-ready data.

    ``{"settings", "budget", "lora_rank", "methods": {method: {"options", "expected_parameters"}},
    "families": {label: {"target": {"effective_rank", "frobenius_norm"}, "methods": {method: metrics}}}}``
    where metrics are ``approximation_metrics`` plus ``trainable_parameters`` and ``seconds``.
    """
    check_methods(methods)
    setups = {method: method_setup(method, settings) for method in methods}
    results: dict[str, Any] = {
        "settings": dataclasses.asdict(settings),
        "budget": settings.parameter_budget,
        "lora_rank": settings.lora_rank,
        "methods": {
            m: {"options": s.options, "expected_parameters": s.expected_parameters} for m, s in setups.items()
        },
        "families": {},
    }
    for family, target in targets.items():
        if tuple(target.shape) != (settings.d_out, settings.d_in):
            raise ValueError(
                f"Target {family!r} is {tuple(target.shape)}, the settings say {settings.d_out}x{settings.d_in}."
            )
        target_sigma = singular_values(target)
        family_results = {
            "target": {
                "effective_rank": effective_rank_from_singular_values(target_sigma).item(),
                "frobenius_norm": torch.linalg.matrix_norm(target).item(),
            },
            "methods": {},
        }
        for method, setup in setups.items():
            fit, trainable, seconds = fit_target(setup, target, settings)
            metrics = approximation_metrics(fit, target, target_sigma)
            metrics.update(trainable_parameters=trainable, seconds=seconds)
            family_results["methods"][method] = metrics
            if log is not None:
                log(
                    f"{family:>12} {METHOD_LABELS[method]:>12}: relative Frobenius error "
                    f"{metrics['relative_frobenius_error']:.4f}, nuclear error {metrics['nuclear_error']:.4f}, "
                    f"effective rank {metrics['effective_rank']:.1f}, {trainable:,} trainable, {seconds:.1f} s"
                )
        results["families"][family] = family_results
    return results


# ----------------------------------------------------------------------------------------------------------
# Reports


def _relative_to_reference(results: dict[str, Any], family: str, method: str, metric: str) -> float | None:
    """``metric`` of ``method`` as a percentage of LoRA's on ``family`` (None without a LoRA run)."""
    methods = results["families"][family]["methods"]
    if REFERENCE_METHOD not in methods or methods[REFERENCE_METHOD][metric] == 0:
        return None
    return 100 * methods[method][metric] / methods[REFERENCE_METHOD][metric]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return markdown_table(header, rows).split("\n")


def _metric_table(results: dict[str, Any], metric: str, digits: int) -> list[str]:
    methods = list(results["methods"])
    rows = []
    for family, family_results in results["families"].items():
        cells = [family]
        for method in methods:
            value = family_results["methods"][method][metric]
            relative = _relative_to_reference(results, family, method, metric)
            cells.append(f"{value:.{digits}f}" + ("" if relative is None else f" ({relative:.0f}%)"))
        rows.append(cells)
    return _table(["target", *(METHOD_LABELS[m] for m in methods)], rows)


def results_markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: Frobenius and nuclear errors (with % of LoRA), effective ranks, sizes."""
    settings = results["settings"]
    methods = list(results["methods"])
    relative_note = " In brackets: as a percentage of LoRA's error." if REFERENCE_METHOD in methods else ""
    lines = [
        f"Matrix approximation, {settings['d_out']}x{settings['d_in']} targets (unit RMS, half precision), "
        f"budget {results['budget']:,} trainable parameters (LoRA rank {results['lora_rank']}), "
        f"AdamW lr {settings['lr']:g}, {settings['steps']} steps, seed {settings['seed']}.",
        "",
        f"Relative Frobenius error ||fit - T||_F / ||T||_F (lower is better).{relative_note}",
        "",
        *_metric_table(results, "relative_frobenius_error", 4),
        "",
        f"Nuclear error: mean |σ_fit - σ_T| over the sorted singular values (lower is better).{relative_note}",
        "",
        *_metric_table(results, "nuclear_error", 3),
        "",
        "Effective rank of the fit (exp of the entropy of σ / Σσ).",
        "",
    ]
    rows = [
        [family, f"{family_results['target']['effective_rank']:.1f}"]
        + [f"{family_results['methods'][m]['effective_rank']:.1f}" for m in methods]
        for family, family_results in results["families"].items()
    ]
    lines += _table(["target", "target itself", *(METHOD_LABELS[m] for m in methods)], rows)
    lines += ["", "Trainable parameters, options and fitting time (summed over the targets).", ""]
    first_family = next(iter(results["families"].values()))["methods"]
    rows = [
        [
            METHOD_LABELS[method],
            f"{first_family[method]['trainable_parameters']:,}",
            ", ".join(f"{k}={v}" for k, v in results["methods"][method]["options"].items()) or "-",
            f"{sum(f['methods'][method]['seconds'] for f in results['families'].values()):.1f} s",
        ]
        for method in methods
    ]
    lines += _table(["method", "trainable parameters", "options", "time"], rows)
    return "\n".join(lines) + "\n"


def plot_results(results: dict[str, Any], path: Path) -> None:
    """Grouped bars per family: Frobenius and nuclear error of each method, as % of LoRA's when it ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(results["families"])
    methods = list(results["methods"])
    relative = REFERENCE_METHOD in methods
    metrics = (("relative_frobenius_error", "Frobenius error"), ("nuclear_error", "nuclear error"))
    figure, axes = plt.subplots(2, 1, figsize=(max(8.0, 1.6 * len(families) + 2), 8.5), sharex=True)
    width = 0.84 / len(methods)
    for axis, (metric, title) in zip(axes, metrics, strict=True):
        for index, method in enumerate(methods):
            values = [
                (_relative_to_reference(results, f, method, metric) or 0.0)
                if relative
                else results["families"][f]["methods"][method][metric]
                for f in families
            ]
            offset = (index - (len(methods) - 1) / 2) * width
            bars = axis.bar(
                [p + offset for p in range(len(families))], values, width, label=METHOD_LABELS[method]
            )
            axis.bar_label(bars, fmt="%.0f" if relative else "%.3g", fontsize=6, rotation=90, padding=2)
        if relative:
            axis.axhline(100, color="gray", linestyle="--", linewidth=1)
        axis.set_ylabel(f"% of LoRA's {title}" if relative else title)
        axis.set_title(f"{title.capitalize()} (lower is better)")
        axis.margins(y=0.15)
        axis.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(families)), families, rotation=15, ha="right")
    figure.legend(
        *axes[0].get_legend_handles_labels(),
        loc="lower center",
        ncol=min(len(methods), 8),
        fontsize=8,
        frameon=False,
    )
    settings = results["settings"]
    figure.suptitle(
        f"Matrix approximation at {settings['d_out']}x{settings['d_in']}, "
        f"~{results['budget']:,} trainable parameters, {settings['steps']} AdamW steps"
    )
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path, dpi=150)
    plt.close(figure)


def write_outputs(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``matrix_approx.json``, ``matrix_approx.md`` and ``matrix_approx.png`` to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"matrix_approx.{kind}" for kind in ("json", "md", "png")}
    write_json_atomic(paths["json"], results)
    paths["md"].write_text(results_markdown(results))
    plot_results(results, paths["png"])
    return paths
