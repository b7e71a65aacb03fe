"""The methods of the matrix approximation benchmark (``kr_vlm.benchmarks.matrix_approx``): settings, each
method's size under the parameter budget, the fit of a one-layer model to a target, and the run."""

from __future__ import annotations

import dataclasses
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kr_vlm.adapters import AdapterConfig, adapted_layers, inject_adapters, kradapter_shapes
from kr_vlm.adapters.inject import count_parameters
from kr_vlm.benchmarks.matrix_approx.targets import check_families, family_label, make_target
from kr_vlm.spectral import effective_rank_from_singular_values, singular_values

COMPARED_METHODS = ("kradapter", "lora", "lokr", "loha", "vera", "randlora", "full", "svd")
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
    unknown = [method for method in methods if method not in COMPARED_METHODS]
    if unknown:
        raise ValueError(
            f"Unknown method(s) {', '.join(map(repr, unknown))}. Valid methods: {', '.join(COMPARED_METHODS)}."
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
    methods: Sequence[str] = COMPARED_METHODS,
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
