"""Checkpoint files that are whole or absent: Lightning's checkpoint IO with a write that cannot half-happen.

Lightning 2.6's ``TorchCheckpointIO`` writes through an fsspec transaction that puts the file in the
system's temporary folder and *moves* it into place when done: where the run folder is on another
filesystem (the usual case on clusters) that move is a copy, so a kill during it leaves a truncated
``last.ckpt`` where the previous good one was; and it silently drops a ``PermissionError`` (a
read-only ``checkpoints/`` gives no checkpoints and exit status 0). `AtomicCheckpointIO` replaces it
through the Trainer's ``plugins`` (``configs/trainer/default.yaml``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fsspec.utils import get_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from kr_vlm.files import leftover_temporaries, write_file_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file in the checkpoint's own folder, fsync, then rename.

    A reader finds the previous checkpoint or the new one, never part of one, on any local
    filesystem. A failed write (full disk, no permission) raises `kr_vlm.files.FileWriteError`
    naming the checkpoint, which stops the run, and leaves no file under the checkpoint's name.
    Remote paths (``s3://...``) keep Lightning's own writer: object stores replace a file whole.
    """

    def __init__(self) -> None:
        super().__init__()
        self._tidied_folders: set[Path] = set()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if get_protocol(str(path)) != "file":
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options; got {storage_options!r}.")
        write_file_atomic(path, lambda handle: torch.save(checkpoint, handle))
        folder = Path(path).parent
        if folder not in self._tidied_folders:
            # A run killed while writing a checkpoint leaves its temporary file (never a checkpoint's
            # name); the run resumed into the folder, which no other run shares, deletes them once.
            for leftover in leftover_temporaries(folder, "*.ckpt"):
                leftover.unlink(missing_ok=True)
            self._tidied_folders.add(folder)
