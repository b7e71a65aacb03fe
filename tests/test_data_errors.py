"""Bad data on disk as a user meets it: images missing from a CoOp dataset are found when the splits are
read (before training), a corrupt image read by a loader worker is one message naming the file, and a run
folder on a full disk is one message naming it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compose_helpers import TINY_MODEL, path_overrides
from coop_layout import make_coop_dataset
from kr_vlm.data import FewShotDataModule
from kr_vlm.data.base import CorruptImageError, DatasetNotFoundError

REPO = Path(__file__).resolve().parents[1]
# A run of the tiny CLIP on a CoOp dataset with the data config's own loader workers (the default).
TINY_RUN = (
    "experiment=demo",
    "data=dtd",
    "data.shots=1",
    *TINY_MODEL,
    "trainer=cpu",
    "logger=csv",
    "~callbacks.rank_monitor",
    "~callbacks.progress_bar",
    "zero_shot_baseline=false",
    "trainer.max_steps=1",
)


def train_command(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python train.py <overrides>` with every path under `tmp_path`, as a user types it."""
    return subprocess.run(
        [sys.executable, "train.py", *path_overrides(tmp_path), *overrides],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def dtd_test_images(root: Path) -> list[Path]:
    return sorted((root / "dtd" / "images").rglob("*test*"))


def test_missing_images_are_found_when_the_splits_are_read(tmp_path):
    make_coop_dataset(tmp_path, "dtd", classes=3, per_class=3)
    images = dtd_test_images(tmp_path)  # all of them are tested
    for image in images[:7]:
        image.unlink()
    datamodule = FewShotDataModule("dtd", root=tmp_path, shots=1, num_workers=0)
    with pytest.raises(DatasetNotFoundError) as raised:
        datamodule.setup("fit")
    message = str(raised.value)
    assert "7 image files listed by dtd/test are" in message and f"missing under {tmp_path / 'dtd' / 'images'}" in message
    assert images[0].relative_to(tmp_path / "dtd" / "images").as_posix() in message
    assert "and 2 more" in message and "data.skip_corrupt=true" in message

    skipping = FewShotDataModule("dtd", root=tmp_path, shots=1, num_workers=0, skip_corrupt=True)
    skipping.setup("fit")  # reported in the log; the loaders skip them


@pytest.mark.slow
def test_train_with_missing_or_corrupt_images_is_one_message(tmp_path):
    data = tmp_path / "data"
    make_coop_dataset(data, "dtd", classes=3, per_class=2)
    missing = dtd_test_images(data)[0]
    kept = missing.read_bytes()
    missing.unlink()
    failed = train_command(tmp_path, *TINY_RUN)
    output = failed.stdout + failed.stderr
    assert failed.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert "DatasetNotFoundError: 1 image files listed by dtd/test are missing under" in output
    assert not list(tmp_path.rglob("last.ckpt"))

    # A corrupt image, read by a loader worker: our error, naming the file, not torch's wrapper.
    missing.write_bytes(kept[:20])
    failed = train_command(tmp_path, *TINY_RUN, "hydra.run.dir=" + str(tmp_path / "second"))
    output = failed.stdout + failed.stderr
    assert failed.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert f"CorruptImageError: Cannot read image '{missing}'" in output
    assert "DataLoader worker" not in output


def test_an_error_of_a_loader_worker_keeps_its_own_message():
    from torch.utils.data import DataLoader, Dataset

    class Corrupt(Dataset):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, index: int):
            raise CorruptImageError("Cannot read image 'a.jpg': truncated.\nReplace it.")

    with pytest.raises(CorruptImageError) as raised:
        next(iter(DataLoader(Corrupt(), num_workers=1)))
    assert str(raised.value) == "Cannot read image 'a.jpg': truncated.\nReplace it."
    assert "in DataLoader worker process 0" in raised.value.worker_traceback


@pytest.fixture
def full_disk(tmp_path):
    """A folder on a tiny tmpfs, full but for an empty `cache/` folder; skipped where mounting is not
    allowed (not root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a full tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        (disk / "cache").mkdir()
        with open(disk / "filler", "wb", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * 4096)
            except OSError:
                pass
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
def test_a_run_folder_on_a_full_disk_is_one_message_naming_it(tmp_path, full_disk):
    run_dir = full_disk / "cache" / "run"
    done = train_command(tmp_path, *TINY_RUN, "data=digits", f"hydra.run.dir={run_dir}")
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert str(full_disk) in output and "Traceback" not in output
