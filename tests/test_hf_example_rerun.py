"""The Hugging Face Trainer example run again after it finished: it says so and writes nothing (the
Trainer, resumed from its final checkpoint, would train one step past --max-steps every time)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from test_run_folder import digests

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer_kradapter.py"


@pytest.mark.slow
def test_the_example_run_again_after_it_finished_changes_nothing(tmp_path):
    def run(*arguments: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(SCRIPT), "--output-dir", str(tmp_path / "run"), *arguments]
        return subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)

    run("--max-steps", "4", "--save-steps", "2")
    before = digests(tmp_path / "run")
    again = run("--max-steps", "4", "--save-steps", "2")
    assert "holds a finished run (step 4, --max-steps 4)" in again.stdout
    assert digests(tmp_path / "run") == before
    assert not (tmp_path / "run" / "checkpoint-5").exists()
