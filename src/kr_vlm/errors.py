"""The one exception type for user errors: ``KrVlmError``, and the one boundary of every command.

Everything kr_vlm raises because of bad input (a config value, a file, a folder) is a ``KrVlmError``
whose message names the key or the path and says what to do. Subclasses also derive from the built-in
type that describes them (``ValueError``, ``FileNotFoundError``, ...), so ``except ValueError`` keeps
working for callers of the library.

``command_boundary`` is how every command (train.py, eval.py, the scripts, the console scripts) ends on
an error: one message, never a traceback on the console (``HYDRA_FULL_ERROR=1`` shows it):

- exit status 1, a user error: a ``KrVlmError``; a configuration error of Hydra or OmegaConf (the message
  names the key) or of Lightning; an ``OSError`` on a path (the message names the path);
- exit status 2, a bug in kr_vlm: anything else, as one line that says where its traceback was saved
  (the run's log file, else a file in the temporary folder).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


# How torch's DataLoader re-raises an error of a worker process in the main one: the same type, built from
# one string that holds the worker's whole traceback, which ends with "<module>.<type>: <message>".
_WORKER_ERROR = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def _worker_message(error_type: type, wrapped: str) -> str:
    """The message of the error that a DataLoader worker raised, out of torch's re-raised text."""
    for marker in (f"{error_type.__module__}.{error_type.__qualname__}: ", f"{error_type.__qualname__}: "):
        start = wrapped.rfind(marker)
        if start >= 0:
            return wrapped[start + len(marker) :].rstrip("\n")
    return wrapped.rstrip("\n").rpartition("\n")[2]


class KrVlmError(Exception):
    """Bad input from the user; the message names what was wrong and the fix.

    Raised in a DataLoader worker (a corrupt image), it reaches the main process as torch re-raises it:
    the same type, with the worker's traceback as its message. The message is then the worker's own
    again, and the traceback is kept as ``worker_traceback``.
    """

    worker_traceback: str | None = None

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        if len(args) == 1 and isinstance(args[0], str) and _WORKER_ERROR.match(args[0]):
            self.worker_traceback = args[0]
            self.args = (_worker_message(type(self), args[0]),)


class ConfigError(KrVlmError, ValueError):
    """A config value (or a function argument that comes from one) that cannot be used."""


class MissingFileError(KrVlmError, FileNotFoundError):
    """A file or folder that the config names does not exist."""


class CorruptFileError(KrVlmError, ValueError):
    """A file exists but cannot be read as what it should be: empty, truncated, or of another kind."""


#: Exit status of a command stopped by a user error, and by a bug in kr_vlm.
USER_ERROR_EXIT, BUG_EXIT = 1, 2

# What to do about an OSError on a path, by its errno.
_OS_ERROR_FIXES = {
    errno.ENOSPC: "Free disk space there, or choose another folder.",
    errno.EROFS: "The filesystem is read-only: choose a folder you can write to.",
    errno.EACCES: "Make it readable (writable, for a folder runs write to), or choose another path.",
    errno.EPERM: "Make it readable (writable, for a folder runs write to), or choose another path.",
    errno.ENAMETOOLONG: "Choose a shorter name (at most 255 bytes a folder or file name).",
    errno.EEXIST: "A file of that name is in the way: give another path, or move the file.",
    errno.ENOTDIR: "A file of that name is in the way of a folder: give another path, or move the file.",
    errno.ENOENT: "Check the path, e.g. the paths.* settings, model.clip.pretrained, adapters_dir, ckpt_path.",
}


def full_error_requested() -> bool:
    """Whether the user asked for tracebacks (``HYDRA_FULL_ERROR=1``, as for Hydra's own errors)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _from_dataloader_worker(message: str) -> str:
    """torch re-raises an error of a DataLoader worker as the same type with the worker's traceback as its
    message ("Caught X in DataLoader worker process 0. Original Traceback ..."): keep the error's own line."""
    if "Original Traceback (most recent call last)" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def _is_a(error: BaseException, class_name: str, module_prefix: str) -> bool:
    """Whether ``error`` is an instance of the class ``class_name`` of a module under ``module_prefix``,
    checked by name so that Lightning or Hydra need not be imported to tell."""
    return any(
        cls.__name__ == class_name and cls.__module__.startswith(module_prefix) for cls in type(error).__mro__
    )


def user_error_message(error: BaseException) -> str | None:
    """The one message a command shows for ``error`` when it is a user error, None when it is a bug."""
    if isinstance(error, KrVlmError):
        return f"{type(error).__name__}: {_from_dataloader_worker(str(error))}"
    if _is_a(error, "CompactHydraException", "hydra"):
        # Hydra's composition errors (a bad override, an unknown config name), as Hydra prints them.
        cause = error.__cause__
        detail = f"\n{cause}" if _is_a(cause, "OmegaConfBaseException", "omegaconf") else ""
        return (
            f"{error}{detail}\n\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."
        )
    if _is_a(error, "OmegaConfBaseException", "omegaconf") or _is_a(error, "HydraException", "hydra"):
        # A value of the wrong type or a missing one, found when the config is read: the message names the key.
        return f"{type(error).__name__}: {error}"
    if _is_a(error, "MisconfigurationException", "lightning"):
        return (
            f"A Lightning setting cannot be used: {error} Check the trainer.* and callbacks.* settings "
            "(python train.py ... --cfg job prints them)."
        )
    if isinstance(error, OSError) and error.filename is not None:
        reason = error.strerror or str(error)
        fix = _OS_ERROR_FIXES.get(error.errno, "Check the path and its permissions.")
        return f"{type(error).__name__}: {reason}: {error.filename}. {fix}"
    return None


def _save_traceback(error: BaseException) -> str:
    """Write ``error``'s traceback to the run's log file (the file handlers of the root logger, which Hydra
    sets up in the run folder), or, before there is one, to a file in the temporary folder; return where."""
    files = [handler for handler in logging.getLogger().handlers if isinstance(handler, logging.FileHandler)]
    if files:
        record = log.makeRecord(
            log.name,
            logging.ERROR,
            __file__,
            0,
            "Bug in kr_vlm:",
            (),
            (type(error), error, error.__traceback__),
        )
        for handler in files:
            handler.handle(record)
            handler.flush()
        return " and ".join(handler.baseFilename for handler in files)
    handle, path = tempfile.mkstemp(
        prefix=f"kr_vlm_traceback_{time.strftime('%Y%m%d-%H%M%S')}_", suffix=".txt"
    )
    with os.fdopen(handle, "w") as file:
        file.write(f"{' '.join(sys.argv)}\n\n")
        file.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
    return path


def report_error(error: BaseException) -> int:
    """Show ``error`` as one message (the traceback of a bug saved, see ``_save_traceback``) and return
    the exit status: ``USER_ERROR_EXIT`` for a user error, ``BUG_EXIT`` for a bug."""
    message = user_error_message(error)
    if message is not None:
        log.error("%s", message)
        return USER_ERROR_EXIT
    try:
        where = _save_traceback(error)
    except OSError as unsaved:  # a full or read-only disk must not hide the error itself
        where = f"nowhere (saving it failed: {unsaved})"
    first_line = (str(error).strip().splitlines() or [""])[0]
    log.error(
        "Bug in kr_vlm (not a mistake in your command), please report it: %s: %s. The full traceback is in "
        "%s; HYDRA_FULL_ERROR=1 shows it on the console.",
        type(error).__name__,
        first_line,
        where,
    )
    return BUG_EXIT


@contextmanager
def command_boundary() -> Iterator[None]:
    """End the command on any exception with one message and exit status 1 (a user error) or 2 (a bug in
    kr_vlm), never a traceback on the console; see the module. ``HYDRA_FULL_ERROR=1`` lets the exception
    through, traceback and all. ``SystemExit`` passes (a command's own exit status); Ctrl-C ends the
    command with status 130, as a shell does."""
    try:
        yield
    except KeyboardInterrupt:
        if full_error_requested():
            raise
        log.error("Interrupted (Ctrl-C).")
        sys.exit(130)
    except Exception as error:
        if full_error_requested():
            raise
        sys.exit(report_error(error))


# The name of the boundary when it handled KrVlmErrors only; code written against it keeps working.
exit_on_user_error = command_boundary
