"""One run a folder (`kr_vlm.run_folder`): the Hydra callback that refuses a folder holding a run, its lock,
the exemptions (resuming in place, the other DDP ranks), and run folder names that never repeat.

The last tests run `train.py` twice into one `hydra.run.dir`, as a user would (slow).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from compose_helpers import TINY_MODEL, run_state_restored
from kr_vlm.cli import CONFIG_DIR
from kr_vlm.run_folder import LOCK_FILE, RANK_VARIABLES, FolderLock, RunFolderGuard, RunFolderInUseError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _launching_process(monkeypatch):
    """The guard's errors raised (not turned into an exit), and this process as the launching one."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def run_config(folder: Path) -> DictConfig:
    return OmegaConf.create({"hydra": {"run": {"dir": str(folder)}}})


def finished_run(folder: Path) -> Path:
    """A folder as a finished training run leaves it: metrics.json and checkpoints."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"checkpoint")
    (folder / "metrics.json").write_text("{}\n")
    return folder


def test_a_new_or_unfinished_folder_is_claimed_and_released(tmp_path):
    crashed = tmp_path / "crashed"
    (crashed / ".hydra").mkdir(parents=True)  # a run that died before its first checkpoint
    for folder in (tmp_path / "new", crashed):
        guard = RunFolderGuard()
        guard.on_run_start(run_config(folder))
        assert (folder / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        assert not FolderLock(folder).acquire()  # held while the run lasts
        guard.on_run_end(run_config(folder))
        after = FolderLock(folder)
        assert after.acquire()
        after.release()


@pytest.mark.parametrize("part", ["metrics.json", "checkpoints/step_100.ckpt"])
def test_a_folder_that_holds_a_run_is_refused_and_left_as_it_was(part, tmp_path):
    folder = tmp_path / "run"
    (folder / part).parent.mkdir(parents=True, exist_ok=True)
    (folder / part).write_text("earlier run")
    with pytest.raises(RunFolderInUseError, match=f"hydra.run.dir={folder} already holds a run .*{part}"):
        RunFolderGuard().on_run_start(run_config(folder))
    assert sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")) == sorted(
        {part, part.split("/")[0]}
    )


def test_a_folder_locked_by_a_live_process_is_refused_and_a_dead_ones_lock_is_not(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from kr_vlm.run_folder import FolderLock; "
            "lock = FolderLock(Path(sys.argv[1])); assert lock.acquire(); print('locked', flush=True); time.sleep(600)",
            str(folder),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderInUseError, match=f"in use by a running process \\(pid {holder.pid}\\)"):
            RunFolderGuard().on_run_start(run_config(folder))
    finally:
        holder.kill()
        holder.wait()
    # The system released the lock of the killed process; its file is still there.
    assert (folder / LOCK_FILE).is_file()
    RunFolderGuard().on_run_start(run_config(folder))


def test_resuming_from_a_checkpoint_of_the_folder_goes_on_in_it(tmp_path):
    folder = finished_run(tmp_path / "run")
    (folder / "metrics.json").unlink()  # interrupted before the end
    RunFolderGuard(resume_from=str(folder / "checkpoints" / "last.ckpt")).on_run_start(run_config(folder))
    other = finished_run(tmp_path / "other")
    with pytest.raises(RunFolderInUseError, match="already holds a run"):
        RunFolderGuard(resume_from=str(other / "checkpoints" / "last.ckpt")).on_run_start(run_config(folder))


def test_resuming_into_a_folder_in_use_is_refused(tmp_path):
    folder = finished_run(tmp_path / "run")
    (folder / "metrics.json").unlink()  # interrupted, and being resumed by another process
    lock = FolderLock(folder)
    assert lock.acquire()
    with pytest.raises(RunFolderInUseError, match="in use by a running process"):
        RunFolderGuard(resume_from=str(folder / "checkpoints" / "last.ckpt")).on_run_start(run_config(folder))


def test_a_sweep_folder_holding_runs_is_refused(tmp_path):
    sweep = tmp_path / "sweep"
    finished_run(sweep / "1")
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    with pytest.raises(
        RunFolderInUseError, match=f"hydra.sweep.dir={sweep} already holds a run .*1/metrics.json"
    ):
        RunFolderGuard().on_multirun_start(config)
    fresh = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "fresh")}}})
    RunFolderGuard().on_multirun_start(fresh)
    assert (tmp_path / "fresh" / LOCK_FILE).is_file()


@pytest.mark.parametrize("variable", ["LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID"])
def test_the_processes_of_other_ranks_write_into_rank_zeros_folder(variable, tmp_path, monkeypatch):
    folder = finished_run(tmp_path / "run")
    lock = FolderLock(folder)
    assert lock.acquire()  # rank zero runs there
    monkeypatch.setenv(variable, "1")
    RunFolderGuard().on_run_start(run_config(folder))


def compose_with_hydra(overrides=(), config_name="train"):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)


def test_training_may_resume_in_its_folder_and_evaluation_never(tmp_path):
    train = compose_with_hydra(["ckpt_path=run/checkpoints/last.ckpt"])
    guard = hydra.utils.instantiate(train.hydra.callbacks.run_folder)
    assert isinstance(guard, RunFolderGuard) and guard.resume_from == "run/checkpoints/last.ckpt"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        evaluation = compose("eval", ["ckpt_path=run/checkpoints/last.ckpt"], return_hydra_config=True)
    assert hydra.utils.instantiate(evaluation.hydra.callbacks.run_folder).resume_from is None


def test_default_folder_names_differ_between_runs_and_hold_within_one(tmp_path):
    first, second = compose_with_hydra(), compose_with_hydra()
    assert first.hydra.run.dir != second.hydra.run.dir  # composed within a second or two of each other
    assert first.hydra.sweep.dir != second.hydra.sweep.dir
    # Resolved again, as Hydra does for every job and Lightning's DDP launcher for its processes, the
    # name stays.
    assert first.hydra.run.dir == first.hydra.run.dir
    with run_state_restored():
        HydraConfig.instance().set_config(first)
        assert HydraConfig.get().run.dir == first.hydra.run.dir


@pytest.mark.parametrize("root", [None, "elsewhere"])
def test_sweep_folders_resolve_without_a_hydra_run(root, tmp_path, monkeypatch):
    """Hydra's launcher resolves hydra.sweep.dir before any job has set up HydraConfig."""
    monkeypatch.chdir(tmp_path)
    if root:
        monkeypatch.setenv("KR_VLM_ROOT", str(tmp_path / root))
    else:
        monkeypatch.delenv("KR_VLM_ROOT", raising=False)
    cfg = compose_with_hydra(["experiment=demo"])
    expected_root = tmp_path / root if root else tmp_path
    assert Path(cfg.hydra.sweep.dir).parent == expected_root / "logs" / "demo" / "multiruns"
    assert cfg.paths.data_dir == str(expected_root / "data")


def test_evaluations_have_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setenv("KR_VLM_ROOT", str(tmp_path))
    train = compose_with_hydra(["experiment=demo"])
    evaluation = compose_with_hydra(["experiment=demo"], "eval")
    assert Path(train.hydra.run.dir).parent == tmp_path / "logs" / "demo" / "runs"
    assert Path(evaluation.hydra.run.dir).parent == tmp_path / "logs" / "demo" / "evals"
    assert Path(evaluation.hydra.sweep.dir).parent == tmp_path / "logs" / "demo" / "eval_multiruns"
    # The rest of Hydra's settings are the training runs': the folder guard, the log file, the help.
    assert evaluation.hydra.callbacks.run_folder._target_ == train.hydra.callbacks.run_folder._target_
    assert evaluation.hydra.job_logging == train.hydra.job_logging
    assert evaluation.hydra.help == train.hydra.help


# ------------------------------------------------------------------------------------ real command lines


def run_into(
    folder: Path, tmp_path: Path, *overrides: str, script: str = "train.py"
) -> subprocess.CompletedProcess:
    """The demo, shortened (tiny model, 2 steps), into `hydra.run.dir=folder`, from `tmp_path`."""
    return subprocess.run(
        [
            sys.executable,
            str(REPO / script),
            "experiment=demo",
            *TINY_MODEL,
            "trainer.max_steps=2",
            f"hydra.run.dir={folder}",
            *overrides,
        ],
        cwd=tmp_path,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.slow
def test_a_second_run_into_the_same_folder_is_refused_and_the_first_kept(tmp_path):
    folder = tmp_path / "shared"
    first = run_into(folder, tmp_path, "seed=1")
    assert first.returncode == 0, first.stderr[-3000:]
    before = digests(folder)
    assert {"metrics.json", ".hydra/config.yaml", "demo.log", "checkpoints/last.ckpt"} <= set(before)

    second = run_into(folder, tmp_path, "seed=2")
    output = second.stdout + second.stderr
    assert second.returncode == 1 and "Traceback" not in output
    assert f"RunFolderInUseError: hydra.run.dir={folder} already holds a run" in output
    assert digests(folder) == before  # .hydra/, the log and the results are the first run's

    # An evaluation never goes on in a training run's folder, even of that run's own checkpoint.
    evaluation = run_into(folder, tmp_path, f"ckpt_path={folder}/checkpoints/last.ckpt", script="eval.py")
    assert evaluation.returncode == 1 and "already holds a run" in evaluation.stdout + evaluation.stderr
    assert digests(folder) == before

    # Resuming the first run in its own folder is what the folder is still open for; finished, it says so
    # and stays as it was.
    resumed = run_into(folder, tmp_path, "seed=1", f"ckpt_path={folder}/checkpoints/last.ckpt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "holds a finished run" in resumed.stdout + resumed.stderr
    assert digests(folder) == before
