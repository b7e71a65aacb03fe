"""The cross-run dashboard (`kr_vlm.dashboard`, scripts/rank_dashboard.py): runs found under sweep
folders, labelled by what differs, one self-contained page and its CSV files, rendered in a real
headless browser where one is installed."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compose_helpers import QUICK_MONITORED, compose_config, run_state_restored
from kr_vlm import cli
from kr_vlm.dashboard import (
    LAYERS_CSV,
    PAGE_FILE,
    RUNS_CSV,
    SPECTRA_CSV,
    RankRun,
    find_runs,
    label_runs,
    main,
)
from kr_vlm.dashboard_figures import rank_over_steps_figure
from kr_vlm.errors import MissingFileError
from metrics_files import write_run

REPO = Path(__file__).resolve().parents[1]
STEPS = 4  # evaluations at steps 0, 2 and 4


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A sweep folder as `train.py -m ... adapter=kradapter,lora` writes it: jobs 0 and 1, tested."""
    tmp_path = tmp_path_factory.mktemp("dashboard")
    for job, adapter in enumerate(["kradapter", "lora"]):
        overrides = [*QUICK_MONITORED, f"adapter={adapter}", f"trainer.max_steps={STEPS}"]
        with run_state_restored():
            cli.train(
                compose_config(tmp_path, [*overrides, f"paths.output_dir={tmp_path / 'sweep' / str(job)}"])
            )
    return tmp_path / "sweep"


@pytest.fixture(scope="module")
def dashboard(sweep) -> Path:
    assert main([str(sweep)]) == 0
    return sweep


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def test_the_monitor_records_each_layers_rank_cap_and_base_weight_norm(sweep):
    for job, cap in (("0", None), ("1", 2)):  # KRAdapter's cap is min(d_out, d_in); LoRA's is r (2)
        layers = json.loads((sweep / job / "rank_history.json").read_text())["layers"]
        for info in layers.values():
            assert info["rank_cap"] == (cap or min(info["shape"]))
            assert info["base_norm"] > 0


def test_a_sweep_gives_one_page_and_its_csv_files(dashboard):
    page = (dashboard / PAGE_FILE).read_text(encoding="utf-8")
    # Self-contained and static: no script, no stylesheet or image from anywhere else.
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//|file:)""", page, flags=re.IGNORECASE)
    # Ranks over steps, heat maps, spectra, relative update size, accuracy against rank.
    assert page.count('src="data:image/png;base64,') == 5
    assert "<td>0</td></tr>" in page and "<td>1</td></tr>" in page  # run folders, relative to the page's

    runs = read_csv(dashboard / RUNS_CSV)
    assert [(run["label"], run["method"], run["rank_cap"], run["steps"]) for run in runs] == [
        ("kradapter", "kradapter", "32", str(STEPS)),  # min(d_out, d_in) of the test CLIP (width 32)
        ("lora", "lora", "2", str(STEPS)),
    ]
    assert all(float(run["top1_clean"]) >= 0 and float(run["effective_rank"]) > 0 for run in runs)

    layers = read_csv(dashboard / LAYERS_CSV)
    histories = {job: json.loads((dashboard / job / "rank_history.json").read_text()) for job in ("0", "1")}
    assert len(layers) == sum(len(h["layers"]) * len(h["steps"]) for h in histories.values())
    lora_layer = next(row for row in layers if row["label"] == "lora" and row["step"] == str(STEPS))
    info = histories["1"]["layers"][lora_layer["layer"]]
    assert float(lora_layer["relative_update"]) == pytest.approx(
        info["frobenius_norm"][-1] / info["base_norm"]
    )

    spectra = read_csv(dashboard / SPECTRA_CSV)
    # Spectra end at the rank cap: LoRA's two singular values a group, nothing of round-off beyond them.
    assert max(int(row["index"]) for row in spectra if row["label"] == "lora") == 2
    assert {row["group"] for row in spectra if row["label"] == "lora"} == {
        # adapter=lora adapts the six linears of both towers, as every adapter config does.
        f"{tower}/{layer}"
        for tower in ("vision", "text")
        for layer in ("q", "k", "v", "o", "fc1", "fc2")
    }


def test_runs_tested_at_several_update_scales_add_the_frontier(sweep, tmp_path):
    """The sweep's runs tested clean digits only (no OOD target, no frontier); an evaluation of job 0's
    adapters at three scales on the shifted digits, below the same folder, makes the frontier."""
    folder = tmp_path / "sweep"
    shutil.copytree(sweep, folder)
    assert main([str(folder)]) == 0
    assert "ID / OOD frontier" not in (folder / PAGE_FILE).read_text(encoding="utf-8")
    trained = json.loads((folder / "0" / "metrics.json").read_text())
    zero_shot, top1 = trained["zero_shot"]["digits"]["top1"], trained["test"]["digits"]["top1"]
    points = {"0": (zero_shot, 0.5), "0.5": ((zero_shot + top1) / 2, 0.52), "1": (top1, 0.45)}
    scales = {
        key: {"test": {"digits": {"top1": id_}, "digits_rotated": {"top1": ood}}}
        for key, (id_, ood) in points.items()
    }
    write_run(
        folder / "eval",
        {"digits": top1, "digits_rotated": 0.45},
        {"digits": "source", "digits_rotated": "shift"},
        dataset="digits",
        evaluation_of=folder / "0" / "adapters",
        test_by_scale=scales,
    )
    assert main([str(folder)]) == 0
    page = (folder / PAGE_FILE).read_text(encoding="utf-8")
    assert "<h2>ID / OOD frontier</h2>" in page and page.count('src="data:image/png;base64,') == 6
    assert "<h3>ID / OOD frontier, distribution_shift: digits, 1 shots, kr-vlm-test-tiny" in page
    # The frontier's numbers are test_frontier.py's: here, that the one model of job 0 is in its table.
    assert "<tbody><tr><td>kradapter</td><td>1</td>" in page


def run(folder: str, method: str, **settings) -> RankRun:
    config = {
        "model": {"adapter": {"method": method, **settings.pop("adapter", {})}, **settings.pop("model", {})}
    }
    metrics = {"method": method, "dataset": "digits", "shots": 16, "seed": 1, "config": config, **settings}
    return RankRun(Path(folder), {"layers": {}, "steps": []}, metrics)


def labels(*runs: RankRun) -> list[str]:
    label_runs(runs)
    return [run.label for run in runs]


def test_runs_are_labelled_by_what_differs_between_them():
    assert labels(run("a", "kradapter"), run("b", "lora")) == ["kradapter", "lora"]
    assert labels(run("a", "lora", seed=1), run("b", "lora", seed=2)) == ["lora, seed 1", "lora, seed 2"]
    assert labels(
        run("a", "lora", shots=4, model={"optimizer": {"lr": 0.01}}),
        run("b", "lora", shots=16, model={"optimizer": {"lr": 0.001}}),
    ) == ["lora, 4 shots, lr=0.01", "lora, 16 shots, lr=0.001"]
    # A method's options tell runs of that method apart, never one method from another.
    assert labels(
        run("a", "lora", adapter={"r": 2}), run("b", "lora", adapter={"r": 8}), run("c", "kradapter")
    ) == ["lora, r=2", "lora, r=8", "kradapter"]
    assert labels(run("0", "lora"), run("1", "lora")) == ["lora (0)", "lora (1)"]  # nothing differs


def test_a_run_that_was_not_tested_is_still_shown(sweep, tmp_path):
    untested = tmp_path / "untested"
    shutil.copytree(sweep / "1", untested)
    (untested / "metrics.json").unlink()
    runs = find_runs([sweep / "0", untested])
    assert [(run.label, run.accuracy()) for run in runs][1] == ("lora", (None, None))


def test_folders_without_runs_are_user_errors(tmp_path):
    with pytest.raises(MissingFileError, match="no such folder"):
        find_runs([tmp_path / "nowhere"])
    with pytest.raises(
        MissingFileError, match=r"No rank_history.json at or below .*\(callbacks.rank_monitor"
    ):
        find_runs([tmp_path])
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path)])
    assert stopped.value.code == 1


def test_the_dashboard_reads_files_without_importing_torch_or_the_training_code():
    imported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, kr_vlm.dashboard; print(sorted(m for m in sys.modules if m.split('.')[0] "
            "in ('torch', 'lightning', 'open_clip', 'peft') or m.startswith('kr_vlm.callbacks')))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert imported.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_script_and_its_help(dashboard, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "scripts/rank_dashboard.py",
            str(dashboard / "0"),
            str(dashboard / "1"),
            "-o",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("2 runs: kradapter, lora") and (tmp_path / PAGE_FILE).is_file()
    # Without -o, runs of several folders go to a new folder, never into the working directory.
    by_default = subprocess.run(
        [sys.executable, "scripts/rank_dashboard.py", str(dashboard / "0"), str(dashboard / "1")],
        cwd=REPO,
        env={**os.environ, "KR_VLM_ROOT": str(tmp_path / "root")},
        capture_output=True,
        text=True,
    )
    assert by_default.returncode == 0, by_default.stderr
    (written,) = (tmp_path / "root" / "logs" / "rank_dashboard").iterdir()
    assert (written / PAGE_FILE).is_file() and f"written to {written}" in by_default.stdout
    assert not (REPO / PAGE_FILE).exists()
    helped = subprocess.run(
        [sys.executable, "scripts/rank_dashboard.py", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert helped.returncode == 0 and "sweep" in helped.stdout


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium here (apt-get install chromium)")
def test_a_headless_browser_renders_the_page_without_errors(dashboard, tmp_path):
    screenshot = tmp_path / "dashboard.png"
    rendered = subprocess.run(
        [
            CHROMIUM,
            *browser_flags(tmp_path),
            f"--screenshot={screenshot}",
            "--window-size=1400,2400",
            (dashboard / PAGE_FILE).resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "LANG": "C"},
    )
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    assert screenshot.read_bytes().startswith(b"\x89PNG") and screenshot.stat().st_size > 50_000
    # What the page logs to the console (JavaScript errors, resources that failed to load) shows as
    # CONSOLE lines; there must be none.
    assert not [line for line in rendered.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def browser_flags(profile: Path) -> list[str]:
    """Headless Chromium offline, as root in a container: no sandbox, no GPU, no network, a fresh profile,
    and the page's console on stderr."""
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
    ]


def test_rank_curves_of_methods_with_caps_of_2_and_32_are_both_readable_on_one_plot(sweep):
    """On a linear axis up to KRAdapter's cap (32), LoRA's rank (at most 2) is a flat line on the floor;
    on the rank axis (log above 1) it sits well above it."""
    runs = find_runs([sweep])
    panels = [axes for axes in rank_over_steps_figure(runs).axes if axes.lines]
    assert len(panels) == 12
    for axes in panels:
        lora = next(line for line in axes.lines if line.get_label() == "lora")
        step, rank = lora.get_xydata()[-1]
        height = axes.transAxes.inverted().transform(axes.transData.transform((step, rank)))[1]
        assert 1 <= rank <= 2 and height > 0.25, (axes.get_title(), rank, height)
