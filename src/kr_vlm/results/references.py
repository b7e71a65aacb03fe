"""Published rows (``reference_results.json``, shipped with kr_vlm) to put beside ours."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kr_vlm.results.summary import TARGET_PROTOCOLS

REFERENCE_FILE = "reference_results.json"


@dataclass(frozen=True)
class Reference:
    """A published row: top-1 % per column (dataset, or `Average` / `Target avg`), and where it is from."""

    name: str
    protocol: str
    shots: int
    top1: dict[str, float]
    source: str


def load_references(path: str | Path | None = None) -> list[Reference]:
    """The published rows of `path`, or of the file shipped with kr_vlm (`REFERENCE_FILE`).

    The file is JSON: ``{"references": [{"name", "protocol", "source", "rows": {"<shots>": {column:
    top1 %}}}]}``, with a protocol of ``few_shot``, ``distribution_shift`` or ``cross_dataset``.
    """
    if path is None:
        text = resources.files("kr_vlm.results").joinpath(REFERENCE_FILE).read_text()
    else:
        text = Path(path).read_text()
    references = []
    for entry in json.loads(text)["references"]:
        if entry["protocol"] not in ("few_shot", *TARGET_PROTOCOLS.values()):
            raise ValueError(
                f"{path or REFERENCE_FILE}: unknown protocol {entry['protocol']!r} of {entry['name']!r}"
            )
        for shots, top1 in entry["rows"].items():
            references.append(
                Reference(entry["name"], entry["protocol"], int(shots), dict(top1), entry["source"])
            )
    return references
