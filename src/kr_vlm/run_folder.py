"""One run a folder: a run (or sweep) refuses to start in a folder that already holds one.

Hydra makes the run folder, writes ``.hydra/`` and opens the log file in it before the task function
runs, so the check cannot wait for the task: ``RunFolderGuard`` is a Hydra callback
(``hydra.callbacks.run_folder``) whose ``on_run_start`` / ``on_multirun_start`` run before Hydra
writes anything. A folder holds a run when it has ``metrics.json`` or a checkpoint, or while a live
process holds its lock file (an ``fcntl.flock``, which the system releases when that process ends,
however it ends). The guard holds the lock of its own folder for the whole run or sweep.

A training run may go on in its own folder: resuming from a checkpoint inside the folder
(``ckpt_path=<run>/checkpoints/last.ckpt hydra.run.dir=<run>``) is allowed, unless another process is
still running there. A run that finished there (its ``metrics.json``) is not resumed: the command says
so and ends with exit status 0, leaving the folder as it was. Only global rank zero checks: the processes of the other DDP ranks write into its
folder (Lightning's launcher passes them that folder; under srun or torchrun every process composes its
own config, so they need one ``hydra.run.dir`` given to all of them).
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kr_vlm.errors import KrVlmError, command_boundary
from kr_vlm.metric_names import METRICS_FILE

log = logging.getLogger(__name__)

LOCK_FILE = ".kr_vlm.lock"
#: What a run that stopped before it finished leaves in its folder (with no metrics.json): its status
#: (``failed`` or ``stopped``) and the error's line, so a folder of runs tells failed runs from finished ones.
FAILED_FILE = "failed.json"
# Set for the processes of the other ranks: by Lightning's DDP launcher (LOCAL_RANK, NODE_RANK), torchrun
# (RANK, LOCAL_RANK) and SLURM (SLURM_PROCID); the launching process of rank zero has none or zeros.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


class RunFolderInUseError(KrVlmError, FileExistsError):
    """The run folder (or sweep folder) already holds a run, or a running process works in it."""


class RunFolderError(KrVlmError, OSError):
    """The run folder (or sweep folder) cannot be made or written: a file in its place, a read-only or full
    disk, a name too long."""


def launched_as_rank_zero() -> bool:
    """Whether this process is the one that launched the run (global rank zero), from the environment."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def finished_parts(folder: Path) -> list[str]:
    """What makes ``folder`` a run folder already: ``metrics.json`` and the checkpoints, relative to it."""
    parts = [METRICS_FILE] if (folder / METRICS_FILE).is_file() else []
    parts += sorted(str(path.relative_to(folder)) for path in folder.glob("checkpoints/*.ckpt"))
    return parts


def is_inside(path: str | os.PathLike | None, folder: Path) -> bool:
    """Whether ``path`` is an existing file inside ``folder`` (relative paths from the working directory)."""
    if not path:
        return False
    path = Path(path).resolve()
    return path.is_file() and folder.resolve() in path.parents


class FolderLock:
    """An exclusive ``fcntl.flock`` on ``<folder>/.kr_vlm.lock``, held until ``release`` or process exit."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self._handle: IO[str] | None = None

    def acquire(self) -> bool:
        """Take the lock (creating the folder) and write this process's id into it; False if it is taken."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Opened without truncating: a process that finds the lock taken leaves the holder's id in place.
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return True

    def holder(self) -> str:
        """The process id that the process holding the lock wrote into it."""
        return self.path.read_text().strip() or "unknown"

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file releases the flock
            self._handle = None


@contextmanager
def _naming(folder: Path, key: str) -> Iterator[None]:
    """Turn an OSError on the run folder into a ``RunFolderError`` that names its config key."""
    try:
        yield
    except OSError as error:
        if isinstance(error, KrVlmError):
            raise
        raise RunFolderError(
            f"{key}={folder} cannot be used as a run folder: {error.strerror or error} "
            f"({error.filename or folder}). Give {key} a folder you can write to, whose name is at most "
            "255 bytes a part and which is not a file, or leave it at its default."
        ) from error


class RunFolderGuard(Callback):
    """Hydra callback: refuse to start a run or sweep whose folder already holds one (see the module).

    ``resume_from`` is the checkpoint a training run resumes from (``ckpt_path``): a checkpoint inside
    the run folder lets the run go on there.
    """

    def __init__(self, resume_from: str | None = None) -> None:
        self.resume_from = resume_from
        self._lock: FolderLock | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(os.path.abspath(config.hydra.run.dir))
        with command_boundary(), _naming(folder, "hydra.run.dir"):
            self._claim(folder, "hydra.run.dir", [folder], resuming=is_inside(self.resume_from, folder))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(os.path.abspath(config.hydra.sweep.dir))
        with command_boundary(), _naming(folder, "hydra.sweep.dir"):
            runs = [folder, *(path for path in sorted(folder.glob("*")) if path.is_dir())]
            self._claim(folder, "hydra.sweep.dir", runs, resuming=False)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def _claim(self, folder: Path, key: str, runs: list[Path], resuming: bool) -> None:
        """Take ``folder``'s lock, unless one of ``runs`` (the folder, a sweep's job folders) holds a run.

        The finished parts are looked at first, read-only: a refused run changes nothing in the folder.
        """
        if not launched_as_rank_zero():
            return
        if resuming and (folder / "metrics.json").is_file():
            # A finished run: resuming it would only test it again and replace its record.
            log.warning(
                "%s=%s holds a finished run (its metrics.json): there is nothing to resume, and its folder is "
                "left as it was. To test it again: python eval.py ckpt_path=%s (into a new folder).",
                key,
                folder,
                self.resume_from,
            )
            sys.exit(0)
        finished = [str(path / part) for path in runs for part in finished_parts(path)]
        if finished and not resuming:
            example = ", ".join(finished[:3]) + (
                f" and {len(finished) - 3} more" if len(finished) > 3 else ""
            )
            continue_hint = (
                f" To continue that run in its folder, add ckpt_path={folder}/checkpoints/last.ckpt."
                if key == "hydra.run.dir"
                else ""
            )
            raise RunFolderInUseError(
                f"{key}={folder} already holds a run ({example}); a second run would overwrite it. Leave "
                f"{key} at its default (a new folder for every run) or give a new folder.{continue_hint}"
            )
        lock = FolderLock(folder)
        if not lock.acquire():
            raise RunFolderInUseError(
                f"{key}={folder} is in use by a running process (pid {lock.holder()}); a second run there "
                f"would mix their files. Leave {key} at its default (a new folder for every run) or give "
                "another folder."
            )
        self._lock = lock

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
