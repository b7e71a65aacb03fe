"""The private names of our dependencies that kr_vlm relies on, in one place.

Each has a test in tests/test_compat.py that it exists and behaves as kr_vlm uses it, and
pyproject.toml bounds the dependency below its next minor release, so an upgrade that moves one
fails there, with its name, instead of in the middle of a run. Import them from here, never from the
dependency. Beyond the names imported below, kr_vlm overrides or reads these members:

- Lightning's ``lightning.pytorch.loggers.csv_logs.ExperimentWriter._check_log_dir_exists`` (the hook
  that deletes an existing ``metrics.csv``; `kr_vlm.loggers` overrides it to keep the rows);
- Lightning's ``RichProgressBar`` attributes ``progress``, ``train_progress_bar_id``,
  ``train_description``, ``is_disabled`` and ``refresh()`` (`kr_vlm.callbacks.progress`), listed in
  `RICH_PROGRESS_BAR_MEMBERS`.
"""

from __future__ import annotations

from open_clip.factory import parse_model_name
from open_clip.pretrained import _get_safe_alternatives as safe_weight_alternatives

__all__ = [
    "OPEN_CLIP_URL_CACHE",
    "RICH_PROGRESS_BAR_MEMBERS",
    "parse_model_name",
    "safe_weight_alternatives",
]

# Where open_clip.pretrained.download_pretrained_from_url puts weights fetched by URL when given no
# cache_dir: a literal inside that function, with no public name.
OPEN_CLIP_URL_CACHE = "~/.cache/clip"

# The members of Lightning's RichProgressBar that `kr_vlm.callbacks.progress.RichStepProgressBar` uses.
RICH_PROGRESS_BAR_MEMBERS = ("progress", "train_progress_bar_id", "train_description", "is_disabled", "refresh")
