"""The one exception type for user errors: ``KrVlmError``, and how the command line shows it.

Everything kr_vlm raises because of bad input (a config value, a file, a folder) is a ``KrVlmError``
whose message names the key or the path and says what to do. The command line shows such an error as
its message alone with exit status 1 (``HYDRA_FULL_ERROR=1`` shows the traceback). Subclasses also
derive from the built-in type that describes them (``ValueError``, ``FileNotFoundError``, ...), so
``except ValueError`` keeps working for callers of the library.
"""

from __future__ import annotations

import logging
import os
import re
import sys
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


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """End the command with a ``KrVlmError``'s message alone and exit status 1, not a traceback.

    With ``HYDRA_FULL_ERROR=1`` the error is raised as usual, so its traceback is shown as for any other
    error. Any other exception (a bug) is never caught here.
    """
    try:
        yield
    except KrVlmError as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s: %s", type(error).__name__, error)
        sys.exit(1)
