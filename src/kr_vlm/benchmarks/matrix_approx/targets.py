"""The target matrices of the matrix approximation benchmark (``kr_vlm.benchmarks.matrix_approx``): the
authors' synthetic families and crops of real checkpoint weights, each scaled to unit RMS entry."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("gaussian", "sparse", "whitened", "lowrank", "highfreq", "lowfreq")
CHECKPOINT_PREFIX = "checkpoint:"
SPARSE_DROP_RATE = 0.9
LOWRANK_KEPT_FRACTION = 0.25
HIGH_FREQUENCIES = (1000.0, 10000.0)
LOW_FREQUENCIES = (1.0, 100.0)
MAX_HARMONICS = 5
WHITENING_EPS = 1e-5


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
