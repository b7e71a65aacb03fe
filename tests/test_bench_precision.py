"""scripts/bench_precision.py: the share of an update a rounded fused weight loses, and a smoke run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from compose_helpers import QUICK

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_precision.py"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_precision", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # the config's callback target imports it by name
    spec.loader.exec_module(module)
    return module


def test_lost_fraction_is_zero_for_a_representable_update_and_one_below_the_rounding_step(bench):
    base = torch.full((4, 4), 1.0)
    visible = torch.full((4, 4), 2.0**-6)  # 1 + 2^-6 is a bf16 number
    assert bench.lost_fraction(base, visible, torch.bfloat16) == 0.0
    invisible = torch.full((4, 4), 2.0**-10)  # under half of bf16's step 2^-7 at 1: rounded away
    assert bench.lost_fraction(base, invisible, torch.bfloat16) == 1.0
    assert bench.lost_fraction(base, invisible, torch.float16) == 0.0  # fp16's step at 1 is 2^-10


@pytest.mark.slow
def test_the_demo_runs_in_every_precision(bench, capsys, tmp_path):
    overrides = [override for override in QUICK if override != "experiment=demo"]
    results = bench.main(["--seeds", "1", "--", *overrides, "trainer.max_steps=2"])
    assert set(results["accuracies"]) == set(bench.PRECISIONS)
    assert [row["step"] for row in results["rounding"]] == [1, 2]
    printed = capsys.readouterr().out
    assert "| 16-mixed |" in printed and "| 2 |" in printed
