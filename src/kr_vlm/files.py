"""Writing the small files kr_vlm keeps next to runs and data (JSON records, caches)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


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
