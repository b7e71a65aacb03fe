"""FewShotDataModule and DistributionShiftDataModule on digits and on tiny CoOp-layout folders."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision.transforms as T
from lightning.pytorch import LightningModule, Trainer

from coop_layout import make_coop_dataset, read_only
from kr_vlm.data import DistributionShiftDataModule, FewShotDataModule
from kr_vlm.data.base import DatasetNotFoundError
from kr_vlm.data.digits import parse_digit_path, split_indices
from kr_vlm.data.loading import shot_repeats
from kr_vlm.data.protocols import DIGIT_SHIFT_SETS
from kr_vlm.data.templates import get_templates
from kr_vlm.errors import ConfigError

SMALL = T.Compose([T.Resize(16), T.ToTensor()])
TINY_SPLITS = {"train": 3, "val": 2, "test": 2}


def digits_module(**overrides) -> FewShotDataModule:
    options = {"dataset": "digits", "shots": 2, "batch_size": 8, "eval_batch_size": 64, "num_workers": 0}
    dm = FewShotDataModule(**(options | overrides))
    dm.set_transforms(SMALL, SMALL)
    return dm


def assert_aligned(dm: FewShotDataModule) -> None:
    val_loaders, test_loaders = dm.val_dataloader(), dm.test_dataloader()
    assert isinstance(val_loaders, list) and isinstance(test_loaders, list)
    assert len(val_loaders) == len(dm.val_tasks) and len(test_loaders) == len(dm.test_tasks)
    for task, loader in zip(dm.val_tasks + dm.test_tasks, val_loaders + test_loaders, strict=True):
        images, labels = next(iter(loader))
        assert images.ndim == 4 and labels.dtype == torch.int64
        assert labels.min() >= 0 and labels.max() < len(task.classnames)
        assert list(loader.dataset.classnames) == list(task.classnames)


def test_digits_few_shot_loaders_and_tasks():
    dm = digits_module(shots=4)
    dm.setup("fit")
    assert dm.train_task.name == "digits" and len(dm.train_task.classnames) == 10
    assert dm.train_task.templates == get_templates("digits", "simple")
    assert len(dm.train_dataset) == 4 * 10
    assert [len(d) for d in dm.val_datasets] == [4 * 10]
    assert [task.name for task in dm.test_tasks] == ["digits"]
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 16, 16) and labels.shape == (8,)
    assert_aligned(dm)


def test_val_is_min_shots_4_and_last_batch_is_kept():
    dm = digits_module(shots=1, batch_size=32)
    dm.setup()
    assert len(dm.train_dataset) == 10 and len(dm.val_datasets[0]) == 10
    loader = dm.train_dataloader()
    assert not loader.drop_last and len(loader) == 1  # 10 images < one batch, still one batch


def _digit_indices(dataset) -> list[int]:
    """The `load_digits()` indices of a digits dataset's samples (their virtual paths' last part)."""
    return [parse_digit_path(path)[1] for path, _ in dataset.samples]


def test_val_shots_validates_on_more_digits_disjoint_from_the_shots_and_the_test_split():
    default, larger = digits_module(shots=16), digits_module(shots=16, val_shots=16)
    for dm in (default, larger):
        dm.setup()
    assert len(default.val_datasets[0]) == 4 * 10 and len(larger.val_datasets[0]) == 16 * 10
    val = _digit_indices(larger.val_datasets[0])
    train, test = _digit_indices(larger.train_dataset), _digit_indices(larger.test_datasets[0])
    assert len(set(val)) == len(val) and set(val) <= set(split_indices()["val"])
    assert not set(val) & set(train) and not set(val) & set(test)
    assert [label for _, label in larger.val_datasets[0].samples].count(3) == 16
    # The training shots are drawn first: a larger validation set leaves them as they were.
    assert larger.train_dataset.samples == default.train_dataset.samples


def test_setup_is_idempotent_and_builds_everything_for_any_stage():
    dm = digits_module()
    dm.setup("test")
    tasks, train = (dm.train_task, dm.val_tasks, dm.test_tasks), dm.train_dataset
    assert train is not None and dm.val_tasks  # all stages' tasks exist after setup("test")
    dm.setup("fit")
    dm.setup("validate")
    assert (dm.train_task, dm.val_tasks, dm.test_tasks) == tasks and dm.train_dataset is train


def test_zero_shot_has_no_train_loader():
    dm = digits_module(shots=0)
    dm.setup()
    assert dm.train_dataset is None
    assert dm.train_task.classnames == dm.test_tasks[0].classnames  # the text side can still be built
    assert len(dm.val_datasets[0]) == 359  # all of val: nothing is sampled
    with pytest.raises(RuntimeError, match="zero-shot"):
        dm.train_dataloader()
    assert_aligned(dm)


def test_transforms_are_required_and_can_come_after_setup():
    dm = FewShotDataModule("digits", shots=1, num_workers=0)
    dm.setup()
    with pytest.raises(RuntimeError, match="set_transforms"):
        dm.test_dataloader()
    flip = T.Compose([T.RandomHorizontalFlip(1.0), T.ToTensor()])
    dm.set_transforms(flip, SMALL)
    assert dm.train_dataset.transform is flip
    assert all(d.transform is SMALL for d in dm.val_datasets + dm.test_datasets)


def test_shuffling_follows_the_seed_only():
    def first_epoch_labels(seed: int, burn: int) -> list[int]:
        torch.manual_seed(burn)  # global state must not matter
        torch.rand(burn)
        dm = digits_module(shots=4, seed=seed)
        return [label for _, labels in dm.train_dataloader() for label in labels.tolist()]

    assert first_epoch_labels(1, 3) == first_epoch_labels(1, 5)
    assert first_epoch_labels(1, 3) != first_epoch_labels(2, 3)


def test_the_training_loader_state_continues_in_a_new_module():
    """Lightning keeps the training loader's state in checkpoints: a new module's loader given that
    state continues the epoch where it was, order and random augmentations alike, with workers."""
    augment = T.Compose([T.RandomResizedCrop(16, scale=(0.2, 1.0)), T.ToTensor()])

    def train_loader():
        dm = digits_module(shots=4, num_workers=2)  # 40 images: 5 batches an epoch
        dm.set_transforms(augment, SMALL)
        return dm.train_dataloader()

    loader = train_loader()
    straight = [images for _ in range(2) for images, _ in loader]
    loader = train_loader()
    batches = iter(loader)
    next(batches), next(batches)
    state = loader.state_dict()  # two batches into the first epoch

    resumed = train_loader()
    resumed.load_state_dict(state)
    rest = [images for _ in range(2) for images, _ in resumed]  # the rest of this epoch, then the next
    assert len(rest) == 3 + 5
    assert all(torch.equal(got, expected) for got, expected in zip(rest, straight[2:], strict=True))


def test_shot_repeats_follow_the_authors_rule():
    # finetune.py: r = shots / batch; below 10, int(10 / r) + 1 copies.
    assert shot_repeats(160, 128, 10) == int(10 / (160 / 128)) + 1 == 9  # 16-shot digits
    assert shot_repeats(10, 128, 10) == int(10 / (10 / 128)) + 1 == 129  # 1 shot of 10 classes
    assert shot_repeats(128, 128, 10) == 11  # one batch of shots: 11 steps, as theirs
    assert shot_repeats(752, 128, 10) == 2  # 16-shot DTD: 11.75 steps
    assert shot_repeats(1280, 128, 10) == 1 and shot_repeats(5000, 128, 10) == 1  # enough already
    assert shot_repeats(160, 128, 0) == 1  # off
    for images in range(1, 400):
        repeats = shot_repeats(images, 32, 7)
        assert (repeats == 1 and images >= 7 * 32) or images * repeats > 7 * 32


def image_keys(loader) -> list[bytes]:
    """One key per image the loader yields in an epoch (its pixels)."""
    return [image.numpy().tobytes() for images, _ in loader for image in images]


def test_an_epoch_repeats_the_shots_to_at_least_min_iterations_per_epoch():
    once = digits_module(shots=4).train_dataloader()  # 40 images, batches of 8
    assert len(once) == 5 and len(image_keys(once)) == 40 == len(set(image_keys(once)))
    repeated = digits_module(shots=4, min_iterations_per_epoch=10).train_dataloader()
    # 40 images < 10 x 8: 80 // 40 + 1 = 3 copies, 120 images in 15 batches.
    assert len(repeated) == 15
    epoch = image_keys(repeated)
    assert len(epoch) == 120 and set(epoch) == set(image_keys(once))
    assert all(epoch.count(key) == 3 for key in set(epoch))  # every shot three times an epoch
    assert image_keys(repeated) != epoch  # the next epoch is another shuffle
    again = digits_module(shots=4, min_iterations_per_epoch=10).train_dataloader()
    assert image_keys(again) == epoch  # the seed alone decides


def test_repeats_count_optimiser_steps_under_gradient_accumulation():
    dm = digits_module(shots=4, min_iterations_per_epoch=10)
    dm.trainer = Trainer(accelerator="cpu", accumulate_grad_batches=2, logger=False)
    # Steps of 2 x 8 images: 160 // 40 + 1 = 5 copies, 200 images in 25 batches of 8 (13 steps).
    assert dm.shot_repeats() == 5 and len(dm.train_dataloader()) == 25


def test_few_shot_split_is_the_same_each_time_it_is_drawn():
    dm, again = digits_module(shots=2), digits_module(shots=2)
    dm.setup()
    again.setup()
    assert again.train_dataset.samples == dm.train_dataset.samples
    assert again.val_datasets[0].samples == dm.val_datasets[0].samples


def test_coop_layout_dataset(tmp_path):
    fake = make_coop_dataset(tmp_path, "oxford_pets", classes=4, per_class=TINY_SPLITS)
    dm = FewShotDataModule("oxford_pets", root=tmp_path, shots=2, num_workers=0, eval_templates="coop")
    dm.set_transforms(SMALL, SMALL)
    dm.setup()
    assert list(dm.train_task.classnames) == fake.classnames
    assert dm.test_tasks[0].templates == ("a photo of a {}, a type of pet.",)
    assert len(dm.train_dataset) == 8 and len(dm.val_datasets[0]) == 8 and len(dm.test_datasets[0]) == 8
    assert all(path.startswith(str(tmp_path)) for path, _ in dm.train_dataset.samples)
    assert_aligned(dm)


@pytest.mark.parametrize(("subsample", "kept"), [("base", [0, 1, 2]), ("new", [3, 4])])
def test_base_to_new(tmp_path, subsample, kept):
    fake = make_coop_dataset(tmp_path, "dtd", classes=5, per_class=TINY_SPLITS)
    dm = FewShotDataModule("dtd", root=tmp_path, shots=2, num_workers=0, subsample=subsample)
    dm.set_transforms(SMALL, SMALL)
    dm.setup()
    names = [fake.classnames[label] for label in kept]
    assert dm.task_name == f"dtd_{subsample}"
    assert [task.name for task in dm.test_tasks] == [f"dtd_{subsample}"]
    assert list(dm.train_task.classnames) == names
    for dataset in [dm.train_dataset, *dm.val_datasets, *dm.test_datasets]:
        assert sorted(set(dataset.labels)) == list(range(len(kept)))
        for path, label in dataset.samples:  # the relabelled image still shows its class
            assert fake.classnames[kept[label]].replace(" ", "_") in path
    assert_aligned(dm)


@pytest.mark.parametrize("sampler", ["kr_vlm", "clip_lora"])
def test_imagenet_validates_on_training_images_apart_from_the_shots(tmp_path, sampler):
    # Its val folder is its test set: selecting on it would select on test images (CLIP-LoRA's rule).
    make_coop_dataset(tmp_path, "imagenet", classes=3, per_class={"train": 9, "test": 2})
    dm = FewShotDataModule("imagenet", root=tmp_path, shots=2, num_workers=0, sampler=sampler)
    dm.setup()
    train, val = dm.train_dataset.samples, dm.val_datasets[0].samples
    assert len(train) == 6 and len(val) == 6 and not set(train) & set(val)
    assert all("/images/train/" in path for path, _ in train + val)
    assert sorted(set(dm.val_datasets[0].labels)) == [0, 1, 2]


def test_imagenet_with_coop_validates_on_the_test_set_as_coop(tmp_path):
    make_coop_dataset(tmp_path, "imagenet", classes=3, per_class={"train": 9, "test": 2})
    dm = FewShotDataModule("imagenet", root=tmp_path, shots=2, num_workers=0, sampler="coop")
    dm.setup()
    assert dm.val_datasets[0].samples == dm.test_datasets[0].samples
    assert all("/images/val/" in path for path, _ in dm.val_datasets[0].samples)


def test_clip_lora_imagenet_needs_k_plus_4_images_a_class(tmp_path):
    make_coop_dataset(tmp_path, "imagenet", classes=2, per_class={"train": [9, 5], "test": 1})
    dm = FewShotDataModule("imagenet", root=tmp_path, shots=2, num_workers=0, sampler="clip_lora")
    with pytest.raises(ConfigError, match=r"label 1 has only 5.*data\.sampler=kr_vlm"):
        FewShotDataModule("imagenet", root=tmp_path, shots=4, num_workers=0, sampler="clip_lora").setup()
    dm.setup()  # 2 + 2 images a class are there
    assert len(dm.train_dataset) == 4


def test_a_read_only_data_root_is_only_read(tmp_path, monkeypatch):
    make_coop_dataset(tmp_path / "shared", "oxford_pets", classes=4, per_class=TINY_SPLITS)
    before = sorted((tmp_path / "shared").rglob("*"))
    with read_only(tmp_path / "shared", monkeypatch):
        dm = FewShotDataModule("oxford_pets", root=tmp_path / "shared", shots=2, num_workers=0)
        dm.setup()
    assert sorted((tmp_path / "shared").rglob("*")) == before
    assert len(dm.train_dataset) == 8


def test_distribution_shift_on_imagenet_with_missing_sets(tmp_path):
    make_coop_dataset(tmp_path, "imagenet", classes=4, per_class={"train": 3, "val": 0, "test": 2})
    make_coop_dataset(tmp_path, "imagenet_a", classes=2, per_class={"test": 2})
    make_coop_dataset(tmp_path, "imagenet_r", classes=3, per_class={"test": 1})
    dm = DistributionShiftDataModule(root=tmp_path, shots=2, num_workers=0)
    dm.set_transforms(SMALL, SMALL)
    with pytest.warns(UserWarning, match="not found") as record:
        dm.setup()
    shift_warnings = [w for w in record if "test sets not found" in str(w.message)]
    assert len(shift_warnings) == 1
    assert "imagenet_v2, imagenet_sketch" in str(shift_warnings[0].message)
    assert [task.name for task in dm.test_tasks] == ["imagenet", "imagenet_a", "imagenet_r"]
    assert [len(task.classnames) for task in dm.test_tasks] == [4, 2, 3]
    assert dm.test_tasks[1].classnames != dm.test_tasks[0].classnames[:2]  # -A has its own classes
    assert [len(d) for d in dm.test_datasets] == [8, 4, 3]
    assert len(dm.train_dataset) == 8
    assert_aligned(dm)


def test_distribution_shift_on_digits():
    dm = DistributionShiftDataModule(
        "digits", shots=1, eval_batch_size=32, num_workers=0, eval_templates="coop"
    )
    dm.set_transforms(SMALL, SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every digits domain is present: no warning
        dm.setup()
    assert [task.name for task in dm.test_tasks] == ["digits", *DIGIT_SHIFT_SETS]
    assert all(task.templates == get_templates("digits", "coop") for task in dm.test_tasks)
    clean, rotated = dm.test_datasets[0], dm.test_datasets[2]
    assert [label for _, label in clean.samples] == [label for _, label in rotated.samples]
    assert not torch.equal(clean[0][0], rotated[0][0])
    assert_aligned(dm)


def test_distribution_shift_keeps_its_hyperparameters():
    dm = DistributionShiftDataModule("digits", shots=1, shift_sets=["digits_edges"], num_workers=0)
    assert dm.hparams["shift_sets"] == ["digits_edges"] and dm.hparams["shots"] == 1


def test_distribution_shift_takes_every_few_shot_option_and_extra_test_sets():
    dm = DistributionShiftDataModule(
        "digits",
        shots=2,
        shift_sets=["digits_edges"],
        test_sets=["glyphs"],
        fraction=0.5,
        classnames="default",
        download=False,
        val_shots=3,
        num_workers=0,
    )
    assert (dm.fraction, dm.val_shots, dm.shift_sets, dm.test_sets) == (
        0.5, 3, ["digits_edges"], ["digits_edges", "glyphs"]
    )
    # A module rebuilt from its hyperparameters (as from a checkpoint) is the same module.
    again = DistributionShiftDataModule(**dm.hparams)
    assert (again.shift_sets, again.test_sets) == (dm.shift_sets, dm.test_sets)


def test_missing_source_is_an_error(tmp_path):
    make_coop_dataset(tmp_path, "imagenet_a", classes=2, per_class={"test": 1})
    dm = DistributionShiftDataModule(root=tmp_path, shots=1, num_workers=0)
    with pytest.raises(DatasetNotFoundError, match="imagenet"):
        dm.setup()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dataset": "no_such_set"}, "Unknown dataset"),
        ({"dataset": "digits", "shots": -1}, "shots must be"),
        ({"dataset": "imagenet_a", "shots": 4}, "evaluation-only"),
        ({"dataset": "digits", "eval_templates": "fancy"}, "eval_templates must be one of"),
        ({"dataset": "digits", "subsample": "novel"}, "subsample must be one of"),
        ({"dataset": "digits", "batch_size": 0}, "batch_size must be"),
        ({"dataset": "digits", "min_iterations_per_epoch": -1}, r"data\.min_iterations_per_epoch must be"),
        ({"dataset": "digits", "min_iterations_per_epoch": 2.5}, r"data\.min_iterations_per_epoch must be"),
        ({"dataset": "digits", "sampler": "dassl"}, r"data\.sampler must be one of kr_vlm, coop, clip_lora"),
        ({"dataset": "digits", "val_shots": 0}, r"data\.val_shots must be a whole number >= 1"),
        ({"dataset": "digits", "val_shots": 2.5}, r"data\.val_shots must be a whole number >= 1"),
    ],
)
def test_bad_few_shot_arguments(options, message):
    with pytest.raises(ConfigError, match=message):
        FewShotDataModule(**options)


def test_bad_shift_arguments():
    with pytest.raises(ValueError, match="No shifted test sets are known for 'dtd'"):
        DistributionShiftDataModule("dtd")
    with pytest.raises(ValueError, match="Unknown test sets"):
        DistributionShiftDataModule("imagenet", shift_sets=["imagenet_c"])


def test_instantiate_from_hydra_config(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    config = OmegaConf.create(
        {
            "_target_": "kr_vlm.data.DistributionShiftDataModule",
            "dataset": "digits",
            "root": str(tmp_path),
            "shots": 1,
            "shift_sets": ["digits_inverted"],
            "num_workers": 0,
        }
    )
    dm = instantiate(config)
    dm.set_transforms(SMALL, SMALL)
    dm.setup()
    assert [task.name for task in dm.test_tasks] == ["digits", "digits_inverted"]


class PixelClassifier(LightningModule):
    """The smallest model that trains on the datamodule's batches and records each test loader's accuracy."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * 16 * 16, 10)
        self.accuracy: dict[int, list[float]] = {}

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return torch.nn.functional.cross_entropy(self.linear(images.flatten(1)), labels)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        images, labels = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.linear(images.flatten(1)), labels))

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        images, labels = batch
        correct = (self.linear(images.flatten(1)).argmax(1) == labels).float().mean().item()
        self.accuracy.setdefault(dataloader_idx, []).append(correct)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fits_and_tests_on_every_loader(tmp_path):
    dm = DistributionShiftDataModule(
        "digits", shots=1, batch_size=5, eval_batch_size=270, num_workers=0, shift_sets=["digits_noisy"]
    )
    dm.set_transforms(SMALL, SMALL)
    model = PixelClassifier()
    trainer = Trainer(
        max_steps=3,
        limit_val_batches=1,
        limit_test_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    assert trainer.global_step == 3
    assert sorted(model.accuracy) == [0, 1]  # one dataloader_idx per test task
