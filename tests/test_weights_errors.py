"""Weights files that cannot be loaded are one user error naming the file and what is wrong: empty,
truncated, a header that is not safetensors', another architecture's tensors; the shipped miniature's
weights changed in place say so and say to reinstall kr_vlm."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kr_vlm.errors import CorruptFileError
from kr_vlm.models import clip, load_clip
from test_data_errors import train_command

SHIPPED = clip.SHIPPED_WEIGHTS[("kr-vlm-mini", "kr-vlm-mini")]


def other_architecture(path: Path) -> Path:
    """The miniature's weights with its text projection of another width: another model's file."""
    tensors = load_file(SHIPPED)
    tensors["text_projection"] = torch.zeros(64, 32, dtype=tensors["text_projection"].dtype)
    save_file(tensors, path)
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda path: b"", "the weights file is empty"),
        (
            lambda path: SHIPPED.read_bytes()[: SHIPPED.stat().st_size // 2],
            "is not a complete safetensors file",
        ),
        (lambda path: b"\xff" * 64 + b"garbage", "is not a complete safetensors file"),
        (
            lambda path: other_architecture(path).read_bytes(),
            "cannot be loaded into model 'kr-vlm-mini'.*size mismatch",
        ),
    ],
    ids=["empty", "truncated", "garbage_header", "other_architecture"],
)
def test_a_weights_file_that_cannot_be_loaded_is_one_error_naming_it(content, message, tmp_path):
    path = tmp_path / "weights.safetensors"
    data = content(path)
    path.write_bytes(data)
    with pytest.raises(CorruptFileError, match=f"model.clip.pretrained={path}.*{message}"):
        load_clip("kr-vlm-mini", pretrained=str(path))


def test_the_shipped_weights_changed_in_place_say_to_reinstall(tmp_path, monkeypatch):
    copy = tmp_path / SHIPPED.name
    shutil.copy(SHIPPED, copy)
    shutil.copy(SHIPPED.with_name(f"{SHIPPED.stem}.metadata.json"), tmp_path)
    monkeypatch.setitem(clip.SHIPPED_WEIGHTS, ("kr-vlm-mini", "kr-vlm-mini"), copy)
    load_clip("kr-vlm-mini", pretrained="kr-vlm-mini")  # intact

    data = bytearray(copy.read_bytes())
    data[-100] ^= 0xFF  # one byte of a tensor: safetensors would load it without a word
    copy.write_bytes(bytes(data))
    with pytest.raises(
        CorruptFileError, match=f"The weights kr_vlm ships, {copy}, are corrupt.*Reinstall kr_vlm"
    ):
        load_clip("kr-vlm-mini", pretrained="kr-vlm-mini")
    copy.write_bytes(bytes(data[:1000]))  # truncated
    with pytest.raises(CorruptFileError, match="are corrupt.*Reinstall kr_vlm"):
        load_clip("kr-vlm-mini", pretrained="kr-vlm-mini")


@pytest.mark.slow
def test_train_with_a_truncated_weights_file_is_one_message(tmp_path):
    weights = tmp_path / "cut.safetensors"
    weights.write_bytes(SHIPPED.read_bytes()[:5000])
    failed = train_command(tmp_path, "experiment=demo", f"model.clip.pretrained={weights}")
    output = failed.stdout + failed.stderr
    assert failed.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert f"CorruptFileError: model.clip.pretrained={weights} is not a complete safetensors file" in output
