"""The aTLAS datasets from the command line, as a user types it: train and test on torchvision's MNIST files,
and an empty data root stopping with one message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from atlas_layout import make_atlas_dataset

REPO = Path(__file__).resolve().parents[1]


def run(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    # KR_VLM_ROOT puts logs/ under tmp_path without another argument on the command line.
    env = {**os.environ, "KR_VLM_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *arguments], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_train_and_test_on_mnist_files_in_torchvision_format(tmp_path):
    root = tmp_path / "datasets"
    make_atlas_dataset(root, "mnist", classes=3, per_class=6)
    assert sorted(path.name for path in (root / "MNIST" / "raw").iterdir()) == [
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
    ]  # fmt: skip
    done = run(
        tmp_path, "train.py", "experiment=demo", "data=mnist", "data.shots=2", "trainer.max_steps=5",
        f"paths.data_dir={root}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (metrics_file,) = (tmp_path / "logs" / "demo" / "runs").glob("*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["dataset"] == "mnist" and metrics["steps"] == 5 and list(metrics["test"]) == ["mnist"]
    log = (metrics_file.parent / "demo.log").read_text()
    digits = ", ".join(f"'{digit}'" for digit in range(10))
    assert f"mnist: class names [{digits}]; templates ['a photo of the number: \"{{}}\".']" in log
    assert "mnist: 6 training images" in log  # 2 shots of the 3 classes written


def test_an_empty_data_root_stops_with_one_message_naming_the_folder(tmp_path):
    root = tmp_path / "datasets"
    root.mkdir()
    done = run(
        tmp_path, "train.py", "experiment=demo", "data=mnist", "data.shots=2", "trainer.max_steps=5",
        f"paths.data_dir={root}",
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in output, output[-3000:]
    (line,) = [line for line in output.splitlines() if "DatasetNotFoundError" in line]
    assert f"Missing dataset folder {root / 'MNIST' / 'raw'}" in line
    assert "train-images-idx3-ubyte" in line and "data.download=true" in line
    assert f"torchvision.datasets.MNIST('{root}', train=True, download=True)" in line
    assert not list(tmp_path.rglob("metrics.json"))
