"""The one exception type for user errors: ``KrVlmError``.

Everything kr_vlm raises because of bad input (a config value, a file, a folder) is a ``KrVlmError``
whose message names the key or the path and says what to do. The command line shows such an error as
its message alone with exit status 1 (``HYDRA_FULL_ERROR=1`` shows the traceback). Subclasses also
derive from the built-in type that describes them (``ValueError``, ``FileNotFoundError``, ...), so
``except ValueError`` keeps working for callers of the library.
"""

from __future__ import annotations


class KrVlmError(Exception):
    """Bad input from the user; the message names what was wrong and the fix."""


class ConfigError(KrVlmError, ValueError):
    """A config value (or a function argument that comes from one) that cannot be used."""
