"""Print pip constraints that pin every dependency of pyproject.toml (and the given extras) to its lower
bound, for `.ci/run --lowest`. torch and torchvision are pinned to the versions the machines hold."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

PINNED = {"torch": "2.14.1", "torchvision": "0.29.1"}

project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[1:]:
    requirements += project["optional-dependencies"][extra]
for requirement in requirements:
    name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
    if name in PINNED:
        print(f"{name}=={PINNED[name]}")
        continue
    lower = re.search(r">=\s*([^,;\s]+)", requirement)
    if lower is None:
        sys.exit(f"{requirement!r} in pyproject.toml has no lower bound (>=) to test.")
    print(f"{name}=={lower.group(1)}")
