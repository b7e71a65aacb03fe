"""The aTLAS datasets from the command line, as a user types it: train and test on torchvision's MNIST files,
an empty data root stopping with one message, and the README's lines composing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig

from atlas_layout import make_atlas_dataset
from compose_helpers import compose_config, run_state_restored
from kr_vlm.atlas_names import ATLAS22

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


def test_the_readme_lines_compose(tmp_path):
    with run_state_restored():
        cfg = compose_config(tmp_path, ["experiment=atlas_zeroshot", "sweep=atlas22"], "eval")
        sweeper = HydraConfig.get().sweeper
    assert sweeper.params.data.split(",") == list(ATLAS22)
    assert cfg.model.clip.name == "ViT-B-32" and cfg.data.shots == 0 and cfg.data.eval_templates == "atlas"
    with run_state_restored():
        cfg = compose_config(
            tmp_path,
            ["experiment=clip_zeroshot", "data=clip_benchmark", "data.name=wds/vtab/cifar10",
             "data.eval_templates=clip_benchmark"],
            "eval",
        )  # fmt: skip
    assert cfg.data.dataset == "clip_benchmark/wds/vtab/cifar10" and cfg.data.classnames == "clip_benchmark"
    with run_state_restored():
        cfg = compose_config(tmp_path, ["experiment=clip_kr_fewshot", "data=cifar10", "data.fraction=0.5"])
    assert cfg.data.fraction == 0.5 and cfg.data.eval_templates == "atlas"


def test_the_authors_protocol_lines_give_every_job_their_draw_and_schedule(tmp_path):
    """The README's two sweeps of the authors' protocol, job by job: RandLoRA's draw and caption recipe, ten
    epochs of repeated shots, or, on a fraction, their per-dataset epochs without repeats."""
    from kr_vlm.data.atlas import FRACTION_EPOCHS

    for dataset in ATLAS22:
        with run_state_restored():
            cfg = compose_config(tmp_path, ["experiment=clip_kr_randlora", "sweep=atlas22", f"data={dataset}"])
        assert cfg.data.dataset == dataset and cfg.data.sampler == "atlas"
        assert cfg.model.loss == "caption_contrastive" and cfg.data.eval_templates == "an_image_of"
        assert cfg.trainer.max_epochs == 10 and cfg.data.min_iterations_per_epoch == 10
        with run_state_restored():
            cfg = compose_config(
                tmp_path,
                ["experiment=clip_kr_randlora_fraction", "sweep=atlas22", f"data={dataset}", "data.fraction=0.5"],
            )
        assert cfg.data.sampler == "atlas" and cfg.data.fraction == 0.5
        assert cfg.data.min_iterations_per_epoch == 0
        assert cfg.trainer.max_epochs == cfg.trainer.check_val_every_n_epoch == FRACTION_EPOCHS[dataset]


def test_the_data_ratio_epochs_of_a_dataset_outside_the_22_are_a_clear_error(tmp_path):
    from omegaconf.errors import InterpolationResolutionError

    with run_state_restored():
        cfg = compose_config(tmp_path, ["experiment=clip_kr_randlora_fraction", "data=dtd"])
    with pytest.raises(InterpolationResolutionError, match=r"aTLAS's 22 datasets only, not 'dtd' \(data.dataset\)"):
        _ = cfg.trainer.max_epochs
