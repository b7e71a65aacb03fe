"""Checkpoint and adapter files are whole or absent: written to a temporary file in their own folder,
fsynced, renamed; a write that fails (full disk, no permission) stops the run naming the file and
leaves nothing under a checkpoint's name.

Failures are made, not waited for: a file whose writes fail after some bytes (a disk that fills up
half-way), and a folder that cannot be written (read-only where chmod stops this user; for root,
which chmod does not stop, opening a file there fails as it would).
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
import torch

import kr_vlm.files
from compose_helpers import QUICK, compose_config, run_state_restored
from kr_vlm import cli
from kr_vlm.adapters import AdapterConfig, inject_adapters, save_adapters
from kr_vlm.checkpoints import AtomicCheckpointIO
from kr_vlm.errors import KrVlmError
from kr_vlm.files import FileWriteError


@pytest.fixture(autouse=True)
def _clear_hydra():
    with run_state_restored():
        yield


class _FillsUp:
    """A binary file that takes ``room`` bytes, then fails every write as a full disk does."""

    def __init__(self, handle, room: int) -> None:
        self._handle, self._room = handle, room

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self._room:
            self._handle.write(data[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self._handle.close()


def disk_fills_up(monkeypatch, name_part: str, room: int = 100) -> None:
    """Writes of kr_vlm's files whose name contains ``name_part`` fail after ``room`` bytes."""

    def opening(path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)  # noqa: SIM115 (closed by the caller)
        return _FillsUp(handle, room) if name_part in Path(path).name and "r" not in mode else handle

    monkeypatch.setattr(kr_vlm.files, "open", opening, raising=False)


def make_unwritable(folder: Path, monkeypatch) -> None:
    """``folder`` exists and no file can be made in it."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    probe = folder / "probe"
    try:
        probe.touch()
    except PermissionError:
        return
    probe.unlink()  # root: permissions do not stop it, so opening a file there fails instead

    def opening(path, *args, **kwargs):
        if Path(path).parent == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(kr_vlm.files, "open", opening, raising=False)


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# ----------------------------------------------------------------------------------- the checkpoint IO


def test_a_checkpoint_is_renamed_into_place_from_its_own_folder(tmp_path, monkeypatch):
    renames = []
    replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda source, target: renames.append((source, target)) or replace(source, target)
    )
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(4)}, path)
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(8)}, path)
    assert torch.load(path, weights_only=True)["step"] == 8
    assert names(path.parent) == ["last.ckpt"]
    assert len(renames) == 2 and all(Path(source).parent == path.parent for source, _ in renames)


def test_a_write_that_fails_half_way_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"weights": torch.zeros(1000)}, path)
    disk_fills_up(monkeypatch, "last.ckpt")
    with pytest.raises(
        FileWriteError, match=re.escape(f"Cannot write {path}: No space left on device")
    ) as raised:
        AtomicCheckpointIO().save_checkpoint({"weights": torch.ones(1000)}, path)
    assert raised.value.errno == errno.ENOSPC and isinstance(raised.value, KrVlmError)
    assert names(tmp_path) == ["last.ckpt"]  # the temporary file is gone
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.zeros(1000))


def test_the_first_checkpoint_in_a_folder_deletes_what_killed_writes_left(tmp_path):
    leftovers = [tmp_path / ".last.ckpt.0a1b.tmp", tmp_path / ".step_4.ckpt.2c3d.tmp"]
    for leftover in [*leftovers, tmp_path / ".notes.txt.4e5f.tmp"]:
        leftover.write_bytes(b"the first bytes of a file")
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(8)}, tmp_path / "step_8.ckpt")
    assert names(tmp_path) == [".notes.txt.4e5f.tmp", "step_8.ckpt"]  # only checkpoints' leftovers go


# ------------------------------------------------------------------------------------------ in a run


def train(tmp_path: Path, *overrides: str) -> dict:
    return cli.train(compose_config(tmp_path, [*QUICK, *overrides]))


def test_a_disk_full_during_a_checkpoint_stops_the_run_and_keeps_the_last_good_one(tmp_path, monkeypatch):
    disk_fills_up(monkeypatch, "step_8.ckpt", room=4096)
    checkpoints = tmp_path / "run" / "checkpoints"
    with pytest.raises(FileWriteError, match=re.escape(f"Cannot write {checkpoints / 'step_8.ckpt'}")):
        train(tmp_path, "trainer.max_steps=12", "callbacks.model_checkpoint.every_n_train_steps=4")
    assert names(checkpoints) == ["last.ckpt", "step_4.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 4
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("where", ["read_only", "under_a_file"])
def test_a_checkpoint_folder_that_cannot_be_written_stops_the_run(tmp_path, monkeypatch, where):
    if where == "read_only":
        checkpoints = tmp_path / "run" / "checkpoints"
        make_unwritable(checkpoints, monkeypatch)
    else:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "checkpoints").write_text("a file where the folder should be")
        checkpoints = tmp_path / "run" / "checkpoints" / "inner"
    overrides = ["trainer.max_steps=4", f"callbacks.model_checkpoint.dirpath={checkpoints}"]
    cfg = compose_config(tmp_path, [*QUICK, *overrides])
    with pytest.raises(FileWriteError, match=re.escape(f"Cannot write {checkpoints / 'last.ckpt'}")):
        cli.train(cfg)
    if where == "read_only":
        assert names(checkpoints) == []
    # The command line shows the message alone and exits with status 1.
    with pytest.raises(SystemExit) as exit_status:
        cli.run_job(cli.train, compose_config(tmp_path, [*QUICK, *overrides]))
    assert exit_status.value.code == 1


# -------------------------------------------------------------------------------------------- adapters


def test_save_adapters_keeps_the_previous_files_when_a_write_fails(tmp_path, monkeypatch):
    model = inject_adapters(torch.nn.Sequential(torch.nn.Linear(64, 64)), AdapterConfig("kradapter", ["0"]))
    save_adapters(model, tmp_path / "adapters")
    saved = {name: (tmp_path / "adapters" / name).read_bytes() for name in names(tmp_path / "adapters")}
    with torch.no_grad():
        model[0].kr_u.fill_(1.0)
    disk_fills_up(monkeypatch, "adapter_model.safetensors")
    with pytest.raises(FileWriteError, match="adapter_model.safetensors: No space left on device"):
        save_adapters(model, tmp_path / "adapters")
    assert {
        name: (tmp_path / "adapters" / name).read_bytes() for name in names(tmp_path / "adapters")
    } == saved
