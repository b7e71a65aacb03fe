"""Each private name of a dependency that kr_vlm relies on (`kr_vlm.compat`) exists and behaves as kr_vlm
uses it: an upgrade that changes one fails here, by name."""

from __future__ import annotations

from pathlib import Path

import open_clip
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

from kr_vlm.compat import (
    OPEN_CLIP_URL_CACHE,
    RICH_PROGRESS_BAR_MEMBERS,
    parse_model_name,
    safe_weight_alternatives,
)


def test_parse_model_name_splits_off_open_clip_s_schemas():
    assert parse_model_name("hf-hub:org/repo") == ("hf-hub", "org/repo")
    assert parse_model_name("local-dir:/models/mine") == ("local-dir", "/models/mine")
    assert parse_model_name("ViT-B-32") == (None, "ViT-B-32")


def test_safe_weight_alternatives_are_open_clip_s_safetensors_names():
    assert list(safe_weight_alternatives(HF_WEIGHTS_NAME)) == [HF_SAFE_WEIGHTS_NAME]
    assert list(safe_weight_alternatives("weights.bin")) == ["weights.safetensors"]
    assert list(safe_weight_alternatives("weights.pth")) == ["weights.safetensors"]
    assert list(safe_weight_alternatives("weights.safetensors")) == []


def test_open_clip_reads_url_weights_from_the_url_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cached = Path(OPEN_CLIP_URL_CACHE).expanduser() / "weights.pt"
    assert cached.is_relative_to(tmp_path)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    # No checksum in this URL: open_clip returns the cached file without opening the URL.
    assert open_clip.download_pretrained_from_url("https://example.invalid/weights.pt") == str(cached)


def test_lightning_s_csv_writer_checks_its_folder_through_the_hook_kr_vlm_overrides(tmp_path):
    calls = []

    class Writer(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            calls.append(self.log_dir)

    Writer(str(tmp_path))
    assert calls == [str(tmp_path)]


def test_rich_progress_bar_has_the_members_kr_vlm_uses():
    bar = RichProgressBar()
    missing = [name for name in RICH_PROGRESS_BAR_MEMBERS if not hasattr(bar, name)]
    assert not missing
    assert callable(bar.refresh)
