"""What the mini benchmark runs: its methods (`BenchmarkMethod`), recipes, learning-rate grids and fixed
rates, the runs (`Job`) and their Hydra overrides, and the settings a command line can change (`Settings`).
The reasons for each choice are in the package docstring (``kr_vlm.benchmarks.mini``)."""

from __future__ import annotations

import dataclasses
import math

from kr_vlm.errors import ConfigError

# The two recipes: CLIP-LoRA's in miniature (every rate of a grid, the rate chosen on validation images,
# and the fixed rate) and the KRAdapter / RandLoRA authors' (their fixed rates).
CLIP_LORA, AUTHORS = "clip_lora", "authors"
RECIPES = (CLIP_LORA, AUTHORS)
EXPERIMENTS = {CLIP_LORA: "mini_kr_fewshot", AUTHORS: "mini_kr_randlora"}
FEW_SHOT, BASE_TO_NEW = "few_shot", "base_to_new"
SOURCE = "digits"
SHIFT_SETS = ("digits_inverted", "digits_rotated", "digits_noisy", "digits_edges")
CROSS_SETS = ("glyphs",)

SEEDS = (1, 2, 3)
# The learning rate is chosen on runs of this many shots (every seed), and base-to-new runs at it.
SELECTION_SHOTS = 16
# Validation digits a class (data.val_shots), from the digits' val split: one image is 0.6 points of
# top-1 over 160 images (2.5 points over the 40 that min(shots, 4) gives).
VAL_SHOTS = 16
# Half mini_kr_fewshot's 200 steps at 16 shots (the budget's main trade), scaled with the shots as
# CLIP-LoRA's 500 x shots is at other counts.
STEPS, STEPS_SHOTS = 100, 16
# The update scales α every trained model is tested at; α = 0 is the base model, the zero-shot run
# of the same recipe, which every frontier takes as its origin.
ALPHAS = (0.5, 1.0)
# Each method's grid: its fixed rate x GRID_RATIO ** k for k in GRID_EXPONENTS, one step below the fixed
# rate and two above, since the benchmark runs half the recipe's steps (the recipe took 5e-3 from
# CLIP-LoRA's 2e-4 by the same reasoning: a shorter schedule asks for a larger rate).
GRID_RATIO = 2.0
GRID_EXPONENTS = (-1, 0, 1, 2)
# A pick at the edge of the rates tried runs the next rate out (xGRID_RATIO), at most this many times a
# method; a pick still at an edge then is reported as such.
MAX_WIDENING = 2

# Every run: CSV logs and none of the callbacks that only observe (the divergence stop stays).
BASE_OVERRIDES = (
    "data=digits",
    "logger=csv",
    "~callbacks.rank_monitor",
    "~callbacks.model_checkpoint",
    "~callbacks.progress_bar",
    "~callbacks.parameter_summary",
)
SIX_LINEARS = "q k v o fc1 fc2"

# The fixed-rate mode, one rate for every adapter as CLIP-LoRA and the KRAdapter authors give one: the
# miniature recipe's own (configs/experiment/mini_kr_fewshot.yaml: CLIP-LoRA's 2e-4 x 25 for a schedule
# 40 times shorter). Full fine-tuning moves the pretrained weights themselves and has its own: the rate
# the field fine-tunes CLIP end to end with (WiSE-FT's 3e-5) times the same 25.
FIXED_LR = 5e-3
FULL_FIXED_LR = 7.5e-4  # 3e-5 x (5e-3 / 2e-4)
# The authors' rates (RandLoRA's vision_language/train.sh and src/args.py): 1e-3 for every method, VeRA
# 1e-2; their full fine-tuning line sets none, so it runs at args.py's default 1e-3 too.
AUTHORS_LR, AUTHORS_VERA_LR = 1e-3, 1e-2


@dataclasses.dataclass(frozen=True)
class BenchmarkMethod:
    """A row of the tables: Hydra overrides on top of the recipe's, and its rates. ``fixed_lr`` is None
    for zero-shot, which trains nothing."""

    key: str
    label: str
    linears: str
    overrides: tuple[str, ...]
    size: str  # the size and scaling, as the tables show them
    fixed_lr: float | None = FIXED_LR
    authors_lr: float | None = AUTHORS_LR

    @property
    def trains(self) -> bool:
        return self.fixed_lr is not None

    def grid(self, exponents: tuple[int, ...] = GRID_EXPONENTS) -> tuple[float, ...]:
        """The learning rates tried before any widening, ascending."""
        if self.fixed_lr is None:
            return ()
        return tuple(sorted(grid_rate(self.fixed_lr, exponent) for exponent in exponents))


def grid_rate(fixed_lr: float, exponent: int) -> float:
    """``fixed_lr x GRID_RATIO ** exponent``, rounded to 6 significant digits so that a rate reached by
    widening (a rate x 2) is the same float as the grid's own."""
    return float(f"{fixed_lr * GRID_RATIO**exponent:.6g}")


BENCHMARK_METHODS: tuple[BenchmarkMethod, ...] = (
    BenchmarkMethod("zero_shot", "zero-shot", "-", ("adapter=none",), "-", None, None),
    BenchmarkMethod(
        "kradapter", "KRAdapter", SIX_LINEARS, ("adapter=kradapter",), "r = floor(sqrt(k)), s = 2"
    ),
    BenchmarkMethod(
        "lora",
        "LoRA",
        SIX_LINEARS,
        ("adapter=lora", "adapter.options.r=10"),
        "r=10, alpha=1, rsLoRA, dropout 0.25",
    ),
    BenchmarkMethod(
        "lora_qkv",
        "LoRA (CLIP-LoRA: q k v, r=2)",
        "q k v",
        ("adapter=lora", "adapter.targets.layers=[q,k,v]"),
        "r=2, alpha=1, rsLoRA, dropout 0.25",
    ),
    BenchmarkMethod(
        "dora",
        "DoRA",
        SIX_LINEARS,
        ("adapter=dora", "adapter.options.r=10"),
        "r=10, alpha=1, rsLoRA, dropout 0.25",
    ),
    BenchmarkMethod(
        "vera",
        "VeRA",
        SIX_LINEARS,
        ("adapter=vera",),
        "r=256 (budget capped by design)",
        authors_lr=AUTHORS_VERA_LR,
    ),
    BenchmarkMethod(
        "lokr",
        "LoKr",
        SIX_LINEARS,
        (
            "adapter=lokr",
            "adapter.options.r=22",
            "adapter.options.alpha=22",
            "adapter.options.decompose_factor=2",
        ),
        "r=22, alpha=22, decompose_factor=2",
    ),
    BenchmarkMethod(
        "loha",
        "LoHa",
        SIX_LINEARS,
        ("adapter=loha", "adapter.options.r=5", "adapter.options.alpha=5"),
        "r=5, alpha=5",
    ),
    BenchmarkMethod(
        "randlora",
        "RandLoRA",
        SIX_LINEARS,
        ("adapter=randlora", "adapter.options.r=4", "adapter.options.randlora_alpha=80"),
        "r=4, alpha=80 (20 r)",
    ),
    BenchmarkMethod(
        "full", "full fine-tuning", SIX_LINEARS, ("adapter=full",), "every weight", fixed_lr=FULL_FIXED_LR
    ),
)
METHODS_BY_KEY = {method.key: method for method in BENCHMARK_METHODS}
# The default run: the budget leaves out DoRA, LoKr and LoHa (low-rank like LoRA; --methods adds them).
DEFAULT_METHODS = ("zero_shot", "kradapter", "lora", "lora_qkv", "vera", "randlora", "full")


def max_steps(shots: int, steps: int = STEPS) -> int:
    """`steps` at 16 shots, scaled with the shots as CLIP-LoRA's 500 x shots."""
    return math.ceil(steps * shots / STEPS_SHOTS)


@dataclasses.dataclass(frozen=True)
class Job:
    """One training (or zero-shot) run of the benchmark."""

    recipe: str  # CLIP_LORA or AUTHORS
    method: str
    protocol: str  # FEW_SHOT or BASE_TO_NEW
    shots: int
    seed: int
    lr: float | None

    @property
    def folder(self) -> str:
        """The run folder, relative to the runs folder."""
        rate = "" if self.lr is None else f"lr{self.lr:g}/"
        return f"{self.recipe}/{self.protocol}/{self.method}/{rate}shots{self.shots}_seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a command line can change; the defaults are the benchmark in docs/."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: tuple[int, ...] = SEEDS
    # Shot counts of the few-shot protocol; the others than SELECTION_SHOTS run at the chosen and fixed rates.
    shots: tuple[int, ...] = (SELECTION_SHOTS,)
    recipes: tuple[str, ...] = RECIPES
    alphas: tuple[float, ...] = ALPHAS
    val_shots: int = VAL_SHOTS
    steps: int = STEPS
    # None: the recipe's 10 epochs.
    authors_epochs: int | None = None
    grid_exponents: tuple[int, ...] = GRID_EXPONENTS
    max_widening: int = MAX_WIDENING
    workers: int = 2
    # Hydra overrides for every run, after the benchmark's own (paths, a smaller model for tests, ...).
    overrides: tuple[str, ...] = ()

    def check(self) -> None:
        """Raise `ConfigError` naming the command-line option of a setting that cannot be run."""
        unknown = [key for key in self.methods if key not in METHODS_BY_KEY]
        if unknown:
            raise ConfigError(f"--methods: unknown {unknown}; known: {', '.join(METHODS_BY_KEY)}.")
        if SELECTION_SHOTS not in self.shots:
            raise ConfigError(
                f"--shots: the learning rate is chosen on {SELECTION_SHOTS}-shot runs; keep it."
            )
        if not self.seeds or not set(self.recipes) <= set(RECIPES) or not self.recipes:
            raise ConfigError(
                f"--seeds and --recipes need at least one value (recipes: {', '.join(RECIPES)})."
            )
        if 0 not in self.grid_exponents or len(set(self.grid_exponents)) < 2:
            raise ConfigError(
                "--grid: give at least two exponents k of fixed rate x 2**k, 0 among them (the fixed rate)."
            )
        if any(alpha < 0 for alpha in self.alphas) or 1.0 not in self.alphas:
            raise ConfigError(f"--alphas: update scales >= 0 with 1 among them, got {list(self.alphas)}.")
        for option, value, least in (
            ("--workers", self.workers, 1),
            ("--val-shots", self.val_shots, 1),
            ("--steps", self.steps, 1),
            ("--max-widening", self.max_widening, 0),
        ):
            if value < least:
                raise ConfigError(f"{option} must be at least {least}, got {value}.")

    @property
    def trained_methods(self) -> list[BenchmarkMethod]:
        return [METHODS_BY_KEY[key] for key in self.methods if METHODS_BY_KEY[key].trains]

    def grid(self, method: BenchmarkMethod) -> tuple[float, ...]:
        return method.grid(self.grid_exponents)


# --quick: the same modes, small: two methods on a two-rate grid, one seed, 10 steps, one authors' epoch.
QUICK = Settings(
    methods=("zero_shot", "kradapter", "lora"),
    seeds=(1,),
    alphas=(0.5, 1.0),
    steps=10,
    authors_epochs=1,
    grid_exponents=(0, 1),
    max_widening=1,
)


def job_overrides(job: Job, settings: Settings) -> list[str]:
    """The Hydra overrides of `job`: its recipe's experiment, the benchmark's own, the method's, the run's."""
    method = METHODS_BY_KEY[job.method]
    overrides = [f"experiment={EXPERIMENTS[job.recipe]}", *BASE_OVERRIDES, *method.overrides]
    if job.recipe == AUTHORS and not method.trains:
        overrides.append("adapter.targets=null")  # the recipe's layers, which adapter=none refuses
    overrides += [f"data.shots={job.shots}", f"seed={job.seed}", f"data.val_shots={settings.val_shots}"]
    if job.lr is not None:
        overrides += [
            f"model.optimizer.lr={job.lr}",
            f"adapter_scales=[{','.join(map(str, settings.alphas))}]",
        ]
        if job.recipe == CLIP_LORA:
            overrides.append(f"trainer.max_steps={max_steps(job.shots, settings.steps)}")
        else:  # the authors' cosine ends at lr / 100 (clip_kr_randlora.yaml)
            overrides.append(f"model.scheduler.min_lr={job.lr / 100:g}")
            if settings.authors_epochs is not None:
                overrides.append(f"trainer.max_epochs={settings.authors_epochs}")
    if job.protocol == BASE_TO_NEW:
        return [*overrides, "data.subsample=base_to_new"]
    return [*overrides, f"data.test_sets=[{','.join((*SHIFT_SETS, *CROSS_SETS))}]"]


def rate_jobs(
    recipe: str, method: str, lr: float, settings: Settings, shots: int = SELECTION_SHOTS
) -> list[Job]:
    """The runs of `method` at `lr`: few-shot at `shots`, and at SELECTION_SHOTS also base-to-new, every seed."""
    jobs = [Job(recipe, method, FEW_SHOT, shots, seed, lr) for seed in settings.seeds]
    if shots == SELECTION_SHOTS:
        jobs += [Job(recipe, method, BASE_TO_NEW, shots, seed, lr) for seed in settings.seeds]
    return jobs


def zero_shot_jobs(settings: Settings) -> list[Job]:
    """Zero-shot on each protocol's test sets, for each recipe (whose templates differ)."""
    if "zero_shot" not in settings.methods:
        return []
    return [
        Job(recipe, "zero_shot", protocol, 0, settings.seeds[0], None)
        for recipe in settings.recipes
        for protocol in (FEW_SHOT, BASE_TO_NEW)
    ]
