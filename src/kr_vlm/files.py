"""Writing the small files kr_vlm keeps next to runs and data (JSON records, caches)."""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The key under which ``write_json_atomic`` lists the values it had to write as ``null``.
NON_FINITE_KEY = "non_finite"


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename it into place.

    A reader (another process, a DDP rank, a rerun after a crash) finds the old file or the new one,
    never half of one. Each call writes its own uniquely named temporary file, so processes writing the
    same file at once (DDP ranks, on one machine or several) do not write into each other's, and the
    file gets the usual permissions (``tempfile.mkstemp`` would make it private to its owner).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


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
