"""write_text_atomic: the file is replaced whole or not at all, and no temporary file is left behind."""

from __future__ import annotations

import os

import pytest

from kr_vlm.files import write_text_atomic


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
