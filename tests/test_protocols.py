"""The protocols' data side: base-to-new in one run, extra test sets (cross-dataset and distribution
shift, one mechanism), CoOp's prompt ensemble, and the global batch divided over DDP processes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torchvision.transforms as T
from hydra.utils import instantiate
from omegaconf import OmegaConf

from coop_layout import make_coop_dataset
from kr_vlm.data import DistributionShiftDataModule, FewShotDataModule
from kr_vlm.data.digits import CLASSNAMES as DIGIT_NAMES
from kr_vlm.data.templates import COOP_IMAGENET_TEMPLATES_SELECT, get_templates
from kr_vlm.errors import ConfigError

SMALL = T.Compose([T.Resize((16, 16)), T.ToTensor()])
SPLITS = {"train": 3, "val": 2, "test": 2}


def set_up(dm: FewShotDataModule) -> FewShotDataModule:
    dm.set_transforms(SMALL, SMALL)
    dm.setup()
    return dm


def test_base_to_new_trains_on_base_and_tests_both_halves_in_one_run(tmp_path):
    fake = make_coop_dataset(tmp_path, "dtd", classes=5, per_class=SPLITS)
    dm = set_up(FewShotDataModule("dtd", root=tmp_path, shots=2, num_workers=0, subsample="base_to_new"))
    base, new = fake.classnames[:3], fake.classnames[3:]  # ceil(5 / 2) = 3 base classes
    assert dm.task_name == "dtd_base" and list(dm.train_task.classnames) == base
    assert [task.name for task in dm.val_tasks] == ["dtd_base"]
    assert [task.name for task in dm.test_tasks] == ["dtd_base", "dtd_new"]
    assert [list(task.classnames) for task in dm.test_tasks] == [base, new]
    assert dm.test_roles == {"dtd_base": "base", "dtd_new": "new"}
    assert sorted(set(dm.train_dataset.labels)) == [0, 1, 2] and len(dm.train_dataset) == 3 * 2
    base_test, new_test = dm.test_datasets
    assert len(base_test) == 3 * 2 and len(new_test) == 2 * 2
    for path, label in new_test.samples:  # relabelled from 0, each image still of its class
        assert new[label].replace(" ", "_") in path


def test_base_to_new_draws_the_shots_of_subsample_base():
    # CoCoOp draws on all classes, then keeps the base half: one run or two, the same training images.
    one_run = set_up(FewShotDataModule("digits", shots=4, num_workers=0, subsample="base_to_new"))
    base_only = set_up(FewShotDataModule("digits", shots=4, num_workers=0, subsample="base"))
    assert one_run.train_dataset.samples == base_only.train_dataset.samples
    assert one_run.test_datasets[0].samples == base_only.test_datasets[0].samples


def test_digits_base_to_new_is_zero_to_four_then_five_to_nine():
    dm = set_up(FewShotDataModule("digits", shots=1, num_workers=0, subsample="base_to_new"))
    assert [list(task.classnames) for task in dm.test_tasks] == [list(DIGIT_NAMES[:5]), list(DIGIT_NAMES[5:])]
    assert [task.name for task in dm.test_tasks] == ["digits_base", "digits_new"]


def test_zero_shot_base_to_new_tests_both_halves():
    # The CLIP rows of CoCoOp's base-to-new table: eval.py experiment=coop_zsclip data.subsample=base_to_new.
    dm = set_up(FewShotDataModule("digits", shots=0, num_workers=0, subsample="base_to_new"))
    assert dm.train_dataset is None and list(dm.train_task.classnames) == list(DIGIT_NAMES[:5])
    assert [task.name for task in dm.test_tasks] == ["digits_base", "digits_new"]
    assert sorted(set(dm.val_datasets[0].labels)) == [0, 1, 2, 3, 4]


def test_extra_test_sets_have_their_own_classes_and_templates_and_missing_ones_are_skipped(tmp_path):
    make_coop_dataset(tmp_path, "imagenet", classes=4, per_class={"train": 6, "test": 2})
    dtd = make_coop_dataset(tmp_path, "dtd", classes=3, per_class=SPLITS)
    make_coop_dataset(tmp_path, "eurosat", classes=2, per_class=SPLITS)
    make_coop_dataset(tmp_path, "imagenet_sketch", classes=4, per_class={"test": 1})
    dm = FewShotDataModule(
        "imagenet",
        root=tmp_path,
        shots=1,
        num_workers=0,
        eval_templates="coop",
        test_sets=["dtd", "ucf101", "eurosat", "imagenet_sketch", "digits_rotated"],
    )
    with pytest.warns(UserWarning, match=r"test sets not found under .*: ucf101\. See data/README.md"):
        set_up(dm)
    assert [task.name for task in dm.test_tasks] == [
        "imagenet",
        "dtd",
        "eurosat",
        "imagenet_sketch",
        "digits_rotated",
    ]
    assert dm.test_roles == {
        "imagenet": "source",
        "dtd": "cross",
        "eurosat": "cross",
        "imagenet_sketch": "shift",  # a shifted ImageNet: distribution shift
        "digits_rotated": "cross",  # not a shift of ImageNet
    }
    tasks = {task.name: task for task in dm.test_tasks}
    assert list(tasks["dtd"].classnames) == dtd.classnames and tasks["dtd"].templates == ("{} texture.",)
    assert tasks["eurosat"].templates == ("a centered satellite photo of {}.",)
    assert tasks["digits_rotated"].templates == get_templates("digits", "coop")
    assert [len(data) for data in dm.test_datasets] == [8, 6, 4, 4, 540]
    assert [list(data.classnames) for data in dm.test_datasets] == [
        list(task.classnames) for task in dm.test_tasks
    ]


def test_distribution_shift_is_the_same_mechanism_with_the_sources_shifted_sets():
    dm = set_up(DistributionShiftDataModule("digits", shots=1, num_workers=0, shift_sets=["digits_noisy"]))
    same = set_up(FewShotDataModule("digits", shots=1, num_workers=0, test_sets=["digits_noisy"]))
    assert dm.shift_sets == dm.test_sets == ["digits_noisy"]
    assert dm.test_roles == same.test_roles == {"digits": "source", "digits_noisy": "shift"}
    assert [data.samples for data in dm.test_datasets] == [data.samples for data in same.test_datasets]


@pytest.mark.parametrize(
    ("test_sets", "message"),
    [
        (["imagenet_c"], r"Unknown test sets \['imagenet_c'\] in data\.test_sets"),
        (["digits_noisy", "digits_noisy"], r"names \['digits_noisy'\] more than once"),
        (["digits"], r"names \['digits'\] although it is the source dataset"),
    ],
)
def test_bad_test_sets(test_sets, message):
    with pytest.raises(ConfigError, match=message):
        FewShotDataModule("digits", test_sets=test_sets)


def test_coop_ensemble_is_coops_seven_templates_and_the_datasets_own():
    assert get_templates("dtd", "coop_ensemble") == (*COOP_IMAGENET_TEMPLATES_SELECT, "{} texture.")
    assert get_templates("imagenet_r", "coop_ensemble")[-1] == "a photo of a {}."
    # ZeroshotCLIP2 adds the dataset's template for every dataset but ImageNet.
    assert get_templates("imagenet", "coop_ensemble") == COOP_IMAGENET_TEMPLATES_SELECT
    assert len(COOP_IMAGENET_TEMPLATES_SELECT) == 7


@pytest.mark.parametrize(("world_size", "per_device"), [(1, 32), (2, 16), (4, 8)])
def test_the_batch_is_global_and_divided_over_the_processes(world_size, per_device):
    dm = set_up(FewShotDataModule("digits", shots=8, batch_size=32, num_workers=0))
    dm.trainer = SimpleNamespace(world_size=world_size)
    assert dm.per_device_batch_size() == per_device
    assert dm.train_dataloader().batch_size == per_device


def test_a_global_batch_that_does_not_divide_is_an_error():
    dm = set_up(FewShotDataModule("digits", shots=8, batch_size=32, num_workers=0))
    assert dm.per_device_batch_size() == 32  # attached to no trainer: one process
    dm.trainer = SimpleNamespace(world_size=3)
    with pytest.raises(ConfigError, match=r"data\.batch_size=32 .* 3 processes .*trainer\.devices"):
        dm.train_dataloader()


def test_lists_from_hydra_are_kept_as_plain_lists_that_checkpoints_can_hold(tmp_path):
    # A checkpoint keeps the DataModule's hyperparameters and is read back with weights_only=True.
    config = {"_target_": "kr_vlm.data.DistributionShiftDataModule", "dataset": "digits", "num_workers": 0}
    dm = instantiate(OmegaConf.create({**config, "shift_sets": ["digits_noisy"], "test_sets": ["glyphs"]}))
    assert type(dm.hparams["shift_sets"]) is list and type(dm.hparams["test_sets"]) is list
    torch.save(dict(dm.hparams), tmp_path / "hparams.pt")
    saved = torch.load(tmp_path / "hparams.pt", weights_only=True)
    assert (saved["shift_sets"], saved["test_sets"]) == (["digits_noisy"], ["glyphs"])
