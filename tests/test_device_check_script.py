"""scripts/gpu_check.sh's own logic, with a stand-in interpreter that answers each step at once: one result line
a step, the line of interest picked from its output, the summary file, and the exit status. (Its real dry run,
KR_VLM_GPU_CHECK_DEVICE=cpu, runs the steps for minutes: it is run by hand, see the README.)"""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

# Answers like the real steps' last lines; bench_rank_monitor fails when FAIL_MONITOR is set.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$@" >>"$CALLS"
case "$*" in
  *pytest*) echo "5 passed, 40 deselected in 3.0s" ;;
  *bench_adapters.py*--methods*) echo "| kradapter | 1 |"; echo "KRAdapter / floor: step time 1.04x (bar <= 1.1x: met)" ;;
  *bench_adapters.py*) echo "KRAdapter / floor: step time 1.02x (bar <= 1.1x: met)" ;;
  *bench_rank_monitor.py*) echo "| 200 | 0.10 % | 0.05 % |"; [[ -n ${FAIL_MONITOR:-} ]] && exit 3 ;;
  *train.py*) echo "demo done"; echo ;;
  *bench_precision.py*) echo "| 32-true | 95.0 / 78.0 | 95.0 / 78.0 |"; echo "| bf16-mixed | 95.1 / 78.1 | 95.1 / 78.1 |" ;;
esac
exit 0
"""


def run_check(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, str, list[str]]:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    calls, summary = tmp_path / "calls.txt", tmp_path / "summary.md"
    result = subprocess.run(
        ["bash", str(SCRIPT), str(summary)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHON": str(fake), "CALLS": str(calls), "KR_VLM_GPU_CHECK_DEVICE": "cpu", **env},
    )
    return result, summary.read_text(), calls.read_text().splitlines()


def test_every_step_passes_with_one_result_line_each(tmp_path):
    result, summary, calls = run_check(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.split("Results (cpu, ")[1].splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == [
        "CUDA-only tests",
        "bench_adapters sweep",
        "bench_adapters every method",
        "bench_rank_monitor",
        "demo",
        "bench_precision",
    ]
    assert "ok (" in lines[0] and lines[0].endswith("| 5 passed, 40 deselected in 3.0s")
    assert lines[1].endswith("| KRAdapter / floor: step time 1.04x (bar <= 1.1x: met)")
    assert lines[3].endswith("| | 200 | 0.10 % | 0.05 % |") and lines[4].endswith("| demo done")
    assert lines[5].endswith("| | bf16-mixed | 95.1 / 78.1 | 95.1 / 78.1 |")
    assert "of 400s)" in lines[1]  # the CPU limits in a dry run
    assert "every step passed" in summary and "## bench_rank_monitor: ok" in summary
    # The dry run's settings: the smallest ones, on the CPU, a small model for the monitor.
    assert any("--model-name ViT-S-32" in call and "--device cpu" in call for call in calls)
    assert not any("pip install" in call for call in calls)


def test_a_failing_step_is_reported_and_the_rest_still_run(tmp_path):
    result, summary, calls = run_check(tmp_path, FAIL_MONITOR="1")
    assert result.returncode == 1
    assert "bench_rank_monitor: FAILED (exit 3)" in result.stdout
    assert any("bench_precision.py" in call for call in calls)
    assert "some steps FAILED or timed out" in summary


@pytest.mark.parametrize("step", ["bench_adapters.py", "bench_rank_monitor.py", "bench_precision.py"])
def test_the_dry_run_settings_are_accepted_by_each_script(step, tmp_path):
    """Each script's own parser accepts the arguments the dry run gives it (nothing is run)."""
    _, _, calls = run_check(tmp_path)
    spec = importlib.util.spec_from_file_location(f"check_{step[:-3]}", ROOT / "scripts" / step)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    given = [call.split()[1:] for call in calls if call.split()[0].endswith(step)]
    assert given
    for arguments in given:
        module.parse_args(arguments)


def test_without_python_set_it_runs_the_repositorys_venv(tmp_path):
    """The README's install makes `.venv`; `bash scripts/gpu_check.sh` in a shell where it is not activated
    must check that environment, not whatever `python` is on PATH."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "scripts" / "gpu_check.sh").write_text(SCRIPT.read_text())
    venv_python = repo / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(FAKE_PYTHON)
    venv_python.chmod(venv_python.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.txt"
    env = {key: value for key, value in os.environ.items() if key != "PYTHON"}
    result = subprocess.run(
        ["bash", str(repo / "scripts" / "gpu_check.sh"), str(tmp_path / "summary.md")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "CALLS": str(calls), "KR_VLM_GPU_CHECK_DEVICE": "cpu"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(calls.read_text().splitlines()) == 6  # every step went through the venv's interpreter
