"""Writing the files kr_vlm keeps next to runs and data (checkpoints, adapters, JSON records, caches)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from kr_vlm.errors import KrVlmError

#: The key under which ``write_json_atomic`` lists the values it had to write as ``null``.
NON_FINITE_KEY = "non_finite"


class FileWriteError(KrVlmError, OSError):
    """A file kr_vlm writes (checkpoint, adapters, JSON record, page) could not be written (full disk, no permission, read-only folder).

    ``errno`` is the failed write's (``errno.ENOSPC``, ``errno.EACCES``, ...); the message names the
    file and what to do.
    """


def new_output_folder(name: str) -> Path:
    """``logs/<name>/<date>_<time>`` under ``$KR_VLM_ROOT`` (else the working directory), as Hydra runs are
    named: where a script writes by default, so that a rerun never replaces what the repository ships
    (``docs/``) or an earlier run wrote. The folder is not made here."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    return Path(os.environ.get("KR_VLM_ROOT", ".")) / "logs" / name / stamp


def _temporary_name(name: str, unique: str) -> str:
    return f".{name}.{unique}.tmp"


def leftover_temporaries(folder: str | Path, name_pattern: str) -> list[Path]:
    """The temporary files of `atomic_write` in ``folder`` for files named like ``name_pattern`` (a
    glob): what a process killed while writing left behind."""
    return sorted(Path(folder).glob(_temporary_name(name_pattern, "*")))


@contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temporary file in ``path``'s folder for binary writing; on success, flush it to disk
    (fsync) and rename it onto ``path``; on any error, delete it and re-raise.

    A reader (another process, a DDP rank, a rerun after a crash or a kill) finds the old file or the
    new one, never half of one, and a failed write (full disk, no permission) leaves no file under
    ``path``'s name. The temporary file lives in the same folder because a rename is atomic only
    within one filesystem (a temporary folder elsewhere would turn it into a copy). Each call writes
    its own uniquely named temporary file, so processes writing the same file at once do not write
    into each other's, and the file gets the usual permissions (``tempfile.mkstemp`` would make it
    private to its owner). The folder must exist.
    """
    path = Path(path)
    temporary = path.with_name(_temporary_name(path.name, uuid.uuid4().hex))
    # Opened before the clean-up's try: when the folder refuses the file there is nothing to clean up.
    handle = open(temporary, "xb")  # noqa: SIM115 (closed by the `with` below)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        # The clean-up never raises: its error (the same full or read-only disk) would hide the first.
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through `write_file_atomic`, creating the folders it needs (a failed
    write raises `FileWriteError` naming ``path``)."""
    write_file_atomic(path, lambda handle: handle.write(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through `write_bytes_atomic`."""
    write_bytes_atomic(path, text.encode("utf-8"))


def _os_error_behind(error: BaseException) -> OSError | None:
    """The OSError that caused ``error``, if any: torch.save reports a failed write of its file
    as a RuntimeError raised while handling the OSError."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def write_file_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Create ``path``'s folder and write ``path`` with ``write(handle)`` through `atomic_write`.

    A failed write (full disk, no permission, a folder that cannot be made) raises `FileWriteError`
    naming ``path``, and leaves nothing under that name: a previous file there stays as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as handle:
            write(handle)
    except Exception as error:
        cause = _os_error_behind(error)
        if cause is None:
            raise
        reason = cause.strerror or str(cause)
        failure = FileWriteError(
            f"Cannot write {path}: {reason}. Nothing was written under that name (a previous file "
            f"there is kept as it was). Free disk space or make {path.parent} writable, or choose another "
            "folder (for a run: hydra.run.dir=...)."
        )
        failure.errno = cause.errno  # (a filename or strerror would replace the message in str())
        raise failure from error


def _finite_only(value: Any, key: str, non_finite: list[str]) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None``; their dotted keys go to ``non_finite``."""
    if isinstance(value, float) and not math.isfinite(value):
        non_finite.append(key)
        return None
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return value
    cleaned = {
        name: _finite_only(item, f"{key}.{name}" if key else str(name), non_finite) for name, item in items
    }
    return cleaned if isinstance(value, Mapping) else list(cleaned.values())


def write_json_atomic(path: str | Path, record: Mapping[str, Any], indent: int | None = 2) -> None:
    """Write ``record`` as JSON that any parser reads (``indent=None``: on one line), through
    ``write_text_atomic``.

    JSON has no NaN or infinity (Python's ``json`` would write the invalid literals ``NaN`` and
    ``Infinity``): such values are written as ``null`` and their dotted keys listed under
    ``"non_finite"`` (``["test.digits.loss"]``), so a reader can tell a missing value from a diverged one.
    """
    if NON_FINITE_KEY in record:
        raise ValueError(f"{path}: the key {NON_FINITE_KEY!r} is reserved for write_json_atomic's flag.")
    non_finite: list[str] = []
    finite = _finite_only(record, "", non_finite)
    if non_finite:
        finite[NON_FINITE_KEY] = non_finite
    write_text_atomic(path, json.dumps(finite, indent=indent, allow_nan=False) + "\n")
