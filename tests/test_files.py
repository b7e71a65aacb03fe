"""write_text_atomic: the file is replaced whole or not at all, and no temporary file is left behind;
write_json_atomic: always valid JSON, non-finite values written as null and flagged."""

from __future__ import annotations

import json
import math
import os

import pytest

from kr_vlm.files import write_json_atomic, write_text_atomic


def test_writes_creates_folders_and_replaces(tmp_path):
    path = tmp_path / "run" / "metrics.json"
    write_text_atomic(path, "first")
    write_text_atomic(path, "second")
    assert path.read_text() == "second"
    assert os.listdir(path.parent) == ["metrics.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_text_atomic(path, "complete")

    def interrupted(source, destination):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, "never seen")
    assert path.read_text() == "complete"
    assert os.listdir(tmp_path) == ["metrics.json"]


def strict_json(text: str):
    """Parse `text` as standard JSON: Python's reader would accept NaN and Infinity, which JSON lacks."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_json_is_valid_with_non_finite_values_as_null_and_flagged(tmp_path):
    path = tmp_path / "metrics.json"
    record = {
        "test": {"digits": {"top1": 0.5, "loss": math.nan}, "noisy": {"loss": -math.inf}},
        "history": [1.0, math.inf, {"rank": math.nan}],
        "steps": 10,
        "name": "demo",
    }
    write_json_atomic(path, record)
    written = strict_json(path.read_text())
    assert written == {
        "test": {"digits": {"top1": 0.5, "loss": None}, "noisy": {"loss": None}},
        "history": [1.0, None, {"rank": None}],
        "steps": 10,
        "name": "demo",
        "non_finite": ["test.digits.loss", "test.noisy.loss", "history.1", "history.2.rank"],
    }
    assert (
        record["test"]["digits"]["loss"] != record["test"]["digits"]["loss"]
    )  # the record is left as it was


def test_json_without_non_finite_values_has_no_flag(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"top1": 0.25, "tags": ["x"]}, indent=None)
    assert (tmp_path / "a.json").read_text() == '{"top1": 0.25, "tags": ["x"]}\n'
    with pytest.raises(ValueError, match="reserved"):
        write_json_atomic(tmp_path / "b.json", {"non_finite": []})
