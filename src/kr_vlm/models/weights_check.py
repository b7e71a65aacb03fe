"""Weights files that cannot be loaded say so, naming the file: empty, truncated, not safetensors, of
another architecture, or (the weights kr_vlm ships) changed since they were installed.

open_clip reads a weights file inside ``create_model`` and lets safetensors', torch's or its own errors
through (a header that cannot be parsed, a missing key): ``check_weights_file`` reads a .safetensors
header before (cheap: the tensors are not read), and ``weights_load_errors`` turns an error raised while
open_clip loads the file into the model into one ``CorruptFileError``. The shipped miniature's sha256 is
in the metadata beside it; hashing its few megabytes costs little next to building the model, so it is
checked at every load: a changed file would otherwise load and give wrong numbers without a word.
"""

from __future__ import annotations

import hashlib
import json
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open

from kr_vlm.errors import CorruptFileError

REINSTALL = (
    "Reinstall kr_vlm (pip install --force-reinstall --no-deps kr_vlm, or pip install -e . again in its "
    "repository), or regenerate the weights with scripts/pretrain_mini.py (README)."
)


def check_shipped_weights(path: Path) -> None:
    """The weights kr_vlm ships at ``path`` have the sha256 that their ``<name>.metadata.json`` records."""
    metadata = path.with_name(f"{path.stem}.metadata.json")
    try:
        expected = json.loads(metadata.read_text())["weights_sha256"]
    except (OSError, ValueError, KeyError) as error:
        raise CorruptFileError(
            f"The metadata of the weights kr_vlm ships, {metadata}, cannot be read ({error}). {REINSTALL}"
        ) from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise CorruptFileError(
            f"The weights kr_vlm ships, {path}, are corrupt: their sha256 is {digest}, and {metadata.name} "
            f"records {expected}. {REINSTALL}"
        )


def check_weights_file(path: str | Path, key: str = "model.clip.pretrained") -> None:
    """A .safetensors weights file has a whole header, tensors that fit in the file, and at least one
    tensor; other formats are left to ``weights_load_errors``."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise CorruptFileError(
            f"{key}={path}: the weights file is empty. Copy it again, or give another file."
        )
    if path.suffix != ".safetensors":
        return
    try:
        with safe_open(str(path), framework="pt") as weights:
            count = len(list(weights.keys()))
    except (SafetensorError, OSError) as error:
        raise CorruptFileError(
            f"{key}={path} is not a complete safetensors file ({error}): it was cut short or is another kind "
            "of file. Copy it again, or give another file."
        ) from None
    if count == 0:
        raise CorruptFileError(f"{key}={path} holds no tensors. Give the weights file of the model.")


def _raised_by_open_clip_loading(error: BaseException) -> bool:
    """Whether ``error`` was raised while open_clip's ``load_checkpoint`` read a file into the model."""
    return any(frame.name == "load_checkpoint" for frame in traceback.extract_tb(error.__traceback__))


@contextmanager
def weights_load_errors(
    path: str | None, model_name: str, key: str = "model.clip.pretrained"
) -> Iterator[None]:
    """Turn an error of open_clip loading ``path`` into model ``model_name`` into one ``CorruptFileError``
    naming the file (another architecture's weights, a file torch cannot read)."""
    try:
        yield
    except Exception as error:
        if path is None or not _raised_by_open_clip_loading(error):
            raise
        detail = " ".join(str(error).split())
        if len(detail) > 400:
            detail = detail[:400] + " ..."
        raise CorruptFileError(
            f"{key}={path} cannot be loaded into model {model_name!r} ({type(error).__name__}: {detail}). "
            f"Are these the weights of another architecture? Give the model they were saved from "
            "(model.clip.name), or weights of this one."
        ) from None
