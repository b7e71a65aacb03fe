"""Every Hydra config composes and instantiates: experiments, data, adapters, trainers, loggers.

Models are swapped for a tiny random CLIP (`compose_helpers.TINY_MODEL`) and datasets for tiny
CoOp-layout folders under tmp_path (`coop_layout.make_coop_dataset`); digits ship with the package.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import open_clip
import pytest
import torch
import torchvision.transforms as T
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from atlas_layout import accept_fabricated_files, make_atlas_dataset
from compose_helpers import FAST, TINY_MODEL, compose_config, run_state_restored
from coop_layout import make_coop_dataset
from kr_vlm import cli
from kr_vlm.adapters import kradapter_shapes
from kr_vlm.adapters.methods import REGISTRY
from kr_vlm.atlas_names import ATLAS22
from kr_vlm.callbacks import EffectiveRankMonitor, ParameterSummary, RichStepProgressBar
from kr_vlm.data import DistributionShiftDataModule, FewShotDataModule
from kr_vlm.data.atlas import atlas_templates
from kr_vlm.data.templates import COOP_IMAGENET_TEMPLATES_SELECT
from kr_vlm.models import CLIPFineTuner

CONFIG_DIR = Path(cli.CONFIG_DIR)
README = Path(__file__).resolve().parents[1] / "README.md"
EXPERIMENTS = sorted(path.stem for path in (CONFIG_DIR / "experiment").glob("*.yaml"))
ADAPTERS = sorted(path.stem for path in (CONFIG_DIR / "adapter").glob("*.yaml"))
TRAINERS = sorted(path.stem for path in (CONFIG_DIR / "trainer").glob("*.yaml"))
# `fewshot` is the base the dataset configs extend (its dataset is `???`); `clip_benchmark` needs
# CLIP_benchmark's data (test_clip_benchmark.py).
DATA_CONFIGS = sorted(
    path.stem for path in (CONFIG_DIR / "data").glob("*.yaml") if path.stem not in ("fewshot", "clip_benchmark")
)
SMALL = T.Compose([T.Resize((16, 16)), T.ToTensor()])
SHOTS = 2  # images per class in the tiny folders; few-shot configs sample them all


@pytest.fixture(autouse=True)
def _clear_hydra():
    with run_state_restored():
        yield


def write_dataset(data_dir: Path, dataset: str) -> None:
    """The tiny CoOp or aTLAS folder(s) a data config reads (nothing for digits and glyphs, which kr_vlm draws)."""
    if dataset in ATLAS22:
        make_atlas_dataset(data_dir, dataset, classes=3, per_class=SHOTS)
    elif dataset not in ("digits", "glyphs"):
        make_coop_dataset(data_dir, dataset, classes=3, per_class=SHOTS)


def readme_names(group: str) -> list[str]:
    """The names the README's list of config groups gives for `group=` (before the first `;`)."""
    line = next(line for line in README.read_text().splitlines() if line.startswith(f"- `{group}=`:"))
    spans = line.split(";")[0].split("`")[3::2]
    return [name for span in spans for name in span.split() if "=" not in name and "." not in name]


def test_config_groups_are_the_documented_ones():
    """The README's experiment table and its list of groups name exactly the config files there are."""
    readme = README.read_text()
    table = readme[readme.index("| experiment | what |") :].split("\n\n")[0].splitlines()[2:]
    documented = {name for row in table for name in row.split("|")[1].split("`")[1::2]}
    assert documented == set(EXPERIMENTS)
    assert set(readme_names("adapter")) == set(ADAPTERS)
    assert set(readme_names("trainer")) == set(TRAINERS)
    assert set(readme_names("logger")) == {path.stem for path in (CONFIG_DIR / "logger").glob("*.yaml")}


def test_train_and_eval_defaults_compose(tmp_path):
    train_cfg = compose_config(tmp_path)
    assert train_cfg.train and train_cfg.test and train_cfg.test_ckpt == "last"
    assert train_cfg.model.adapter.method == "kradapter"
    # CLIP-LoRA's length: 500 x shots iterations, validated once at the end.
    assert train_cfg.trainer.max_steps == 500 * train_cfg.data.shots == train_cfg.trainer.val_check_interval
    assert train_cfg.trainer.precision == cli.auto_precision()  # 32-true on a CPU, bf16-mixed on recent GPUs
    eval_cfg = compose_config(tmp_path, config_name="eval")
    assert eval_cfg.adapters_dir is None and eval_cfg.ckpt_path is None
    assert eval_cfg.model.adapter.method == "none"


def test_clip_kr_fewshot_follows_clip_lora_recipe(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=clip_kr_fewshot", "data.shots=4"])
    assert (cfg.model.clip.name, cfg.model.clip.pretrained) == ("ViT-B-16", "openai")
    assert cfg.adapter.method == "kradapter" and list(cfg.adapter.targets.layers) == [
        "q",
        "k",
        "v",
        "o",
        "fc1",
        "fc2",
    ]
    assert cfg.adapter.targets.towers == "both" and cfg.adapter.targets.blocks == "all"
    assert cfg.model.optimizer.lr == 2e-4 and cfg.model.optimizer.weight_decay == 1e-2
    assert cfg.model.scheduler.min_lr == 1e-6 and cfg.model.logit_scale == 100
    assert cfg.data.batch_size == 32 and cfg.data.train_templates == "simple"
    assert cfg.trainer.max_steps == 2000


def test_clip_lora_fewshot_is_clip_lora_as_published(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=clip_lora_fewshot"])
    adapter = cfg.model.adapter
    assert adapter.method == "lora" and list(adapter.targets.layers) == ["q", "k", "v"]
    options = adapter.options
    assert (options.r, options.lora_alpha, options.lora_dropout, options.use_rslora) == (2, 1, 0.25, True)
    assert adapter.targets.towers == "both" and adapter.targets.blocks == "all"


def test_clip_kr_randlora_is_the_authors_recipe(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=clip_kr_randlora"])
    assert (cfg.model.clip.name, cfg.model.clip.pretrained) == ("ViT-B-32", "openai")
    assert open_clip.get_pretrained_cfg("ViT-B-32", "openai")  # a tag open_clip knows
    # Their CLIPVL multiplies the cosines by open_clip's logit_scale parameter itself: ln 100 for OpenAI's.
    assert cfg.model.loss == "caption_contrastive" and cfg.model.logit_scale == pytest.approx(math.log(100))
    assert (cfg.data.train_templates, cfg.data.eval_templates) == ("an_image_of", "an_image_of")
    optimizer, scheduler = cfg.model.optimizer, cfg.model.scheduler
    assert (optimizer.lr, optimizer.weight_decay, list(optimizer.betas)) == (1e-3, 0.1, [0.9, 0.999])
    assert (scheduler.warmup_steps, scheduler.warmup_ratio, scheduler.min_lr) == (0, 0.0, 1e-5)
    assert (cfg.data.batch_size, cfg.data.min_iterations_per_epoch) == (128, 10)
    trainer = cfg.trainer
    assert (trainer.max_epochs, trainer.max_steps, trainer.check_val_every_n_epoch) == (10, -1, 10)
    assert (trainer.gradient_clip_val, trainer.accumulate_grad_batches) == (1.0, 1)
    assert list(cfg.model.clip.train_crop_scale) == [0.5, 1.0] and cfg.model.clip.train_flip
    assert list(cfg.adapter.targets.layers) == ["q", "k", "v", "fc1", "fc2"]
    assert (cfg.adapter.targets.towers, cfg.adapter.targets.blocks) == ("both", "all")

    vision = compose_config(tmp_path, ["experiment=clip_kr_randlora_vision"])
    assert (vision.model.loss, vision.model.logit_scale, vision.adapter.targets.towers) == (
        "class_ce",
        None,
        "vision",
    )
    assert vision.data.train_templates == vision.data.eval_templates == "coop_ensemble"


RECIPE_KEYS = (
    "adapter",
    "model.loss",
    "model.optimizer",
    "model.scheduler",
    "model.clip.train_crop_scale",
    "model.clip.train_flip",
    "data.batch_size",
    "data.min_iterations_per_epoch",
    "data.train_templates",
    "data.eval_templates",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.gradient_clip_val",
)


def test_mini_kr_randlora_is_the_recipe_on_the_miniature(tmp_path):
    recipe = compose_config(tmp_path, ["experiment=clip_kr_randlora"])
    cfg = compose_config(tmp_path, ["experiment=mini_kr_randlora"])
    assert all(OmegaConf.select(cfg, key) == OmegaConf.select(recipe, key) for key in RECIPE_KEYS)
    assert (cfg.model.clip.name, cfg.data.dataset, cfg.trainer.accelerator) == (
        "kr-vlm-mini",
        "digits",
        "cpu",
    )
    # The authors' loss multiplies by the logit_scale parameter: the shipped miniature's own.
    assert cfg.model.logit_scale == cli.build_model(cfg).clip_model.logit_scale.item()


def test_the_recipe_s_length_and_draw_follow_the_shots_and_seed_of_the_command_line(tmp_path):
    """The experiment derives its length (CLIP-LoRA's 500 x shots) and the few-shot draw's seed from the
    command line's `data.shots` and `seed`, not from its own defaults."""
    cfg = compose_config(tmp_path, ["experiment=clip_kr_fewshot", "data=dtd", "data.shots=8", "seed=3"])
    assert (cfg.data.seed, cfg.trainer.max_steps, cfg.trainer.val_check_interval) == (3, 4000, 4000)


EXPERIMENT_SETUPS = {
    # experiment: (top config, datasets to write, extra overrides)
    "clip_kr_fewshot": ("train", ["oxford_pets"], [f"data.shots={SHOTS}"]),
    "clip_lora_fewshot": ("train", ["oxford_pets"], [f"data.shots={SHOTS}"]),
    # ImageNet and two of its four shifted sets: the missing ones are skipped with a warning.
    "clip_kr_ood": ("train", ["imagenet", "imagenet_v2", "imagenet_sketch"], [f"data.shots={SHOTS}"]),
    "clip_zeroshot": ("eval", ["oxford_pets"], []),
    "coop_zsclip": ("eval", ["oxford_pets"], []),
    "coop_zsclip_ensemble": ("eval", ["oxford_pets"], []),
    "clip_lora_zeroshot": ("eval", ["oxford_pets"], []),
    "clip_kr_base2new": ("train", ["oxford_pets"], [f"data.shots={SHOTS}"]),
    # ImageNet and two of the ten other datasets: the missing ones are skipped with a warning.
    "clip_kr_cross_dataset": ("train", ["imagenet", "dtd", "eurosat"], [f"data.shots={SHOTS}"]),
    "demo": ("train", [], []),
    "mini_kr_fewshot": ("train", [], []),
    "clip_kr_randlora": ("train", ["oxford_pets"], [f"data.shots={SHOTS}"]),
    "clip_kr_randlora_vision": ("train", ["oxford_pets"], [f"data.shots={SHOTS}"]),
    "clip_kr_randlora_fraction": ("train", ["oxford_pets_atlas"], []),
    "mini_kr_randlora": ("train", [], []),
    "mini_zeroshot": ("eval", [], []),
    "atlas_zeroshot": ("eval", ["cifar10"], []),
}
# The test templates of the zero-shot experiments on oxford_pets: the baseline each one reproduces.
ZERO_SHOT_TEMPLATES = {
    "clip_zeroshot": ("a photo of a {}, a type of pet.",),  # CoOp's ZeroshotCLIP
    "coop_zsclip": ("a photo of a {}, a type of pet.",),
    "coop_zsclip_ensemble": (
        *COOP_IMAGENET_TEMPLATES_SELECT,
        "a photo of a {}, a type of pet.",
    ),  # ZeroshotCLIP2
    "clip_lora_zeroshot": ("a photo of a {}.",),  # CLIP-LoRA's zero-shot row
    "mini_zeroshot": ("a photo of a {}.",),
    "atlas_zeroshot": atlas_templates("CIFAR10"),  # aTLAS's 18 CIFAR templates
}
# The few-shot draw of each experiment that reproduces a paper's protocol.
SAMPLERS = {
    "clip_kr_fewshot": "clip_lora",
    "clip_lora_fewshot": "clip_lora",
    "clip_kr_base2new": "coop",
    "clip_kr_cross_dataset": "coop",
    "clip_kr_ood": "coop",
    "clip_kr_randlora": "atlas",
    "clip_kr_randlora_fraction": "atlas",
}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_instantiates(experiment, tmp_path, monkeypatch):
    config_name, datasets, overrides = EXPERIMENT_SETUPS[experiment]
    accept_fabricated_files(monkeypatch)
    for dataset in datasets:
        write_dataset(tmp_path / "data", dataset)
    cfg = compose_config(tmp_path, [f"experiment={experiment}", *TINY_MODEL, *FAST, *overrides], config_name)
    assert cfg.task_name == experiment

    if experiment in ("clip_kr_ood", "clip_kr_cross_dataset"):
        missing = "imagenet_a, imagenet_r" if experiment == "clip_kr_ood" else "caltech101, oxford_pets"
        with pytest.warns(UserWarning, match=missing):
            datamodule = cli.build_datamodule(cfg, "fit")
    else:
        datamodule = cli.build_datamodule(cfg, "fit")
    module = cli.build_model(cfg)
    assert isinstance(module, CLIPFineTuner)
    cli.use_model_transforms(datamodule, module)
    images, _ = next(iter(datamodule.test_dataloader()[0]))
    assert images.shape[1:] == (3, 16, 16)  # the tiny model's own eval transform
    trainer = cli.build_trainer(cfg)

    assert isinstance(trainer, Trainer) and isinstance(trainer.logger, CSVLogger)
    test_sets = [task.name for task in datamodule.test_tasks]
    method = cfg.model.adapter.method
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert (trainable > 0) == (method != "none")
    if experiment in ZERO_SHOT_TEMPLATES:
        assert method == "none" and datamodule.shots == 0 and datamodule.train_dataset is None
        assert datamodule.test_tasks[0].templates == ZERO_SHOT_TEMPLATES[experiment]
    else:
        assert len(datamodule.train_dataset) > 0
    if experiment in SAMPLERS:
        assert datamodule.sampler == SAMPLERS[experiment]
    if experiment == "clip_kr_base2new":
        assert test_sets == ["oxford_pets_base", "oxford_pets_new"]
        assert datamodule.test_roles == {"oxford_pets_base": "base", "oxford_pets_new": "new"}
        assert datamodule.train_task.classnames == datamodule.test_tasks[0].classnames
    elif experiment == "clip_kr_cross_dataset":
        assert test_sets == ["imagenet", "dtd", "eurosat"]
        assert set(datamodule.test_roles.values()) == {"source", "cross"}
    elif experiment == "clip_kr_ood":
        assert isinstance(datamodule, DistributionShiftDataModule)
        assert test_sets == ["imagenet", "imagenet_v2", "imagenet_sketch"]
    elif experiment in ("demo", "mini_zeroshot"):
        assert test_sets == ["digits", "digits_inverted", "digits_rotated", "digits_noisy", "digits_edges"]
        if experiment == "demo":
            callbacks = {type(callback) for callback in trainer.callbacks}
            assert {
                EffectiveRankMonitor,
                ParameterSummary,
                ModelCheckpoint,
                RichStepProgressBar,
                LearningRateMonitor,
            } <= callbacks
    else:
        assert test_sets == [datamodule.dataset]


def test_demo_adapts_the_shipped_miniature_clip(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=demo"])
    assert (cfg.model.clip.name, cfg.model.clip.pretrained, cfg.cpu_threads) == (
        "kr-vlm-mini",
        "kr-vlm-mini",
        1,
    )
    # The mini recipe: the model's learned logit scale, CLIP-LoRA's optimiser at a scaled learning rate.
    assert cfg.model.logit_scale is None and cfg.model.optimizer.lr == 5e-3
    assert (cfg.model.optimizer.weight_decay, cfg.model.scheduler.min_lr) == (1e-2, 1e-6)
    assert (cfg.data.dataset, cfg.data.shots, cfg.trainer.max_steps) == ("digits", 16, 200)
    module = cli.build_model(cfg)
    # KRAdapter on the six linears of 4 vision blocks of width 128 and 4 text blocks of width 64.
    per_block = {}
    for width in (128, 64):
        k, _, r, r2 = kradapter_shapes(width, width)
        k_mlp, _, r_mlp, r2_mlp = kradapter_shapes(4 * width, width)
        per_block[width] = 4 * k * (r + r2) + 2 * k_mlp * (r_mlp + r2_mlp)
    trainable = sum(p.numel() for _, p in module.trainable_parameters())
    assert trainable == 4 * per_block[128] + 4 * per_block[64] == 143_360
    assert module.preprocess_val.transforms[0].size in (32, (32, 32))


@pytest.mark.parametrize("data", sorted(path.stem for path in (CONFIG_DIR / "data").glob("*.yaml")))
def test_data_configs_inherit_fewshot_and_set_only_what_differs(data):
    """A data config extends data/fewshot.yaml (directly or through another data config) and sets
    only the keys whose values differ from it: a copied key would go stale when fewshot.yaml changes."""
    if data == "fewshot":
        return
    own = OmegaConf.load(CONFIG_DIR / "data" / f"{data}.yaml")
    parents = list(own.get("defaults", []))
    assert parents and all((CONFIG_DIR / "data" / f"{parent}.yaml").is_file() for parent in parents), data
    base = OmegaConf.load(CONFIG_DIR / "data" / "fewshot.yaml")
    copied = [key for key in own if key != "defaults" and key in base and own[key] == base[key]]
    assert not copied, f"data/{data}.yaml repeats fewshot.yaml's {copied}"


@pytest.mark.parametrize("data", DATA_CONFIGS)
def test_data_config_instantiates(data, tmp_path, monkeypatch):
    accept_fabricated_files(monkeypatch)
    cfg = compose_config(tmp_path, [f"data={data}", "data.num_workers=0", "data.shots=1"])
    source = cfg.data.dataset
    write_dataset(tmp_path / "data", source)
    for extra in cfg.data.get("shift_sets") or cfg.data.get("test_sets") or ():
        write_dataset(tmp_path / "data", extra)  # every extra test set is there: no warning
    if data == "imagenet_ood":
        for shifted in ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
            make_coop_dataset(tmp_path / "data", shifted, classes=3, per_class=SHOTS)
    datamodule = cli.instantiate(cfg.data)
    assert isinstance(datamodule, FewShotDataModule)
    assert datamodule.root == str(tmp_path / "data")
    datamodule.set_transforms(SMALL, SMALL)
    datamodule.setup("fit")
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape[1:] == (3, 16, 16) and labels.max() < len(datamodule.train_task.classnames)
    assert len(datamodule.test_dataloader()) == len(datamodule.test_tasks)
    if data.endswith("_ood"):
        assert len(datamodule.test_tasks) == 5  # the source and its four shifted sets
    elif data == "imagenet_cross_dataset":
        assert [task.name for task in datamodule.test_tasks] == ["imagenet", *cfg.data.test_sets]
        assert len(datamodule.test_tasks) == 11  # ImageNet and the ten other few-shot datasets
    else:
        assert [task.name for task in datamodule.test_tasks] == [source]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_adapter_config_instantiates_on_the_tiny_model(adapter, tmp_path):
    cfg = compose_config(tmp_path, [*TINY_MODEL, f"adapter={adapter}"])
    module = cli.build_model(cfg)
    assert module.adapter_method == adapter
    trainable = module.trainable_parameters()  # raises if anything but adapter tensors trains
    assert bool(trainable) == (adapter != "none")


@pytest.mark.parametrize("trainer", TRAINERS)
def test_trainer_config_composes(trainer, tmp_path):
    cfg = compose_config(tmp_path, [f"trainer={trainer}"])
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert cfg.trainer.max_steps == 500 * cfg.data.shots
    needs_gpu = cfg.trainer.accelerator == "gpu"
    if needs_gpu and not torch.cuda.is_available():
        pytest.skip(f"trainer={trainer} needs a GPU")
    built = cli.instantiate(cfg.trainer, logger=False, callbacks=[])
    assert isinstance(built, Trainer)
    if trainer == "ddp_cpu":
        assert built.num_devices == 2 and type(built.strategy).__name__ == "DDPStrategy"


def test_gpu_and_fsdp_configs(tmp_path):
    gpu = compose_config(tmp_path, ["trainer=gpu"]).trainer
    assert (gpu.accelerator, gpu.devices, gpu.precision) == ("gpu", 1, "bf16-mixed")
    fsdp = compose_config(tmp_path, ["trainer=fsdp"]).trainer
    assert fsdp.strategy._target_ == "lightning.pytorch.strategies.FSDPStrategy"
    assert fsdp.strategy.use_orig_params  # frozen base weights and trainable adapters share flat parameters


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "csv_tensorboard", "wandb", "mlflow"])
def test_logger_config_instantiates(logger, tmp_path):
    # TensorBoard is a dependency of kr_vlm; the other trackers are optional (the `loggers` extra).
    if logger in ("wandb", "mlflow") and importlib.util.find_spec(logger) is None:
        pytest.skip(f"{logger} is not installed")
    cfg = compose_config(tmp_path, [f"logger={logger}"])
    loggers = cli.instantiate_list(cfg.logger)
    assert len(loggers) == (2 if logger == "csv_tensorboard" else 1)
    for built in loggers:
        built.log_hyperparams({"seed": cfg.seed})
        built.log_metrics({"train/loss": 1.0}, step=0)
        built.finalize("success")
    # Offline: everything lands under the run folder (mlflow: a file store under the log folder).
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert written and all(
        path.is_relative_to(tmp_path / "run") or path.is_relative_to(tmp_path / "logs") for path in written
    )


@pytest.mark.parametrize(
    ("override", "full_key", "problem"),
    [
        ("adapter.options.rnak=4", "adapter.options.rnak", "Key 'rnak' not in 'KRAdapterOptions'"),
        ("adapter.options.rank=four", "adapter.options.rank", "could not be converted to Integer"),
        ("model.optimizer.lr=fast", "model.optimizer.lr", "could not be converted to Float"),
        ("model.scheduler.warmup=5", "model.scheduler.warmup", "Key 'warmup' not in 'SchedulerOptions'"),
        (
            "model.loss=caption",
            "model.loss",
            "Invalid value 'caption', expected one of [class_ce, caption_contrastive]",
        ),
    ],
)
def test_a_wrong_key_or_type_fails_at_composition_with_its_full_name(override, full_key, problem, tmp_path):
    with pytest.raises(ConfigCompositionException) as raised:
        compose_config(tmp_path, ["adapter=kradapter", override])
    cause = str(raised.value.__cause__)
    assert f"full_key: {full_key}" in cause and problem in cause


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_every_adapter_config_is_typed_by_its_method_s_options(adapter, tmp_path):
    cfg = compose_config(tmp_path, [f"adapter={adapter}"])
    assert set(cfg.adapter) == {"method", "targets", "options"} and cfg.adapter.method == adapter
    assert OmegaConf.get_type(cfg.adapter.options) is REGISTRY[adapter].options


@pytest.mark.parametrize("adapter", [name for name in ADAPTERS if name != "none"])
def test_every_adapter_config_adapts_the_same_six_linears_of_both_towers(adapter, tmp_path):
    # So that `adapter=<method>` compares methods on equal terms; CLIP-LoRA's q k v is its experiment's.
    targets = compose_config(tmp_path, [f"adapter={adapter}"]).adapter.targets
    assert list(targets.layers) == ["q", "k", "v", "o", "fc1", "fc2"]
    assert (targets.towers, targets.blocks) == ("both", "all")


def test_the_hyperparameter_search_composes(tmp_path):
    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        pytest.skip("hydra-optuna-sweeper is not installed (pip install -e '.[optuna]')")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", ["hparams_search=demo_lr", "experiment=demo"], return_hydra_config=True)
    assert cfg.optimized_metric == "val/top1" and cfg.hydra.mode.name == "MULTIRUN"
    assert "model.optimizer.lr" in cfg.hydra.sweeper.params
