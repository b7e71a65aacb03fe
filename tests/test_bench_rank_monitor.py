"""Smoke test of scripts/bench_rank_monitor.py on the tiny CLIP, so the benchmark cannot rot."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from kr_vlm.models.attention import convert_attention

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_rank_monitor.py"


def test_benchmark_measures_both_ways_of_evaluating(tiny_clip, monkeypatch, capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_rank_monitor", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "build_base_model", lambda targets, device, name: convert_attention(tiny_clip))
    figures = bench.main(
        ["--repeats", "2", "--warmup", "0", "--window-steps", "1", "--dense-svd", "--batch-size", "2"]
        + ["--markdown", str(tmp_path / "monitor.md")]
    )
    printed = capsys.readouterr().out
    assert "| 200 |" in printed and "previous: dense SVD" in printed
    assert figures["foreground_evaluation_seconds"] > 0 and figures["step_seconds"] > 0
    assert {"background_evaluation_seconds", "dense_svd_overhead_percent_every_200"} <= figures.keys()
    page = (tmp_path / "monitor.md").read_text()
    assert "- command: `python scripts/bench_rank_monitor.py --repeats 2" in page and "load average" in page
    assert "| 200 |" in page
