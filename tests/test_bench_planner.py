"""Smoke test for bench/bench_planner.py: a small run writes the report and the figures, and the figures
are the simulator's, move with the plans, and rank them as they must."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_planner.py"


def test_small_run_ranks_the_plans_under_both_semantics(tmp_path):
    out = tmp_path / "results"
    args = ["--repeats", "1", "--scaling", "20", "--out", str(out), "--json", str(tmp_path / "p.json")]
    result = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "p.json").read_text())
    secs = figures["iteration_s"]
    assert set(secs) == {"ours", "ours, planned for SkipPipe's semantics", "SkipPipe's plan", "full pipeline",
                         "random skip (median of 5 seeds)"}
    for name, by in secs.items():
        assert set(by) == {"runtime", "skippipe"} and all(math.isfinite(s) and s > 0 for s in by.values()), name
    for sem in ("runtime", "skippipe"):
        assert secs["ours"][sem] < secs["random skip (median of 5 seeds)"][sem] < secs["full pipeline"][sem]
        assert secs["ours"][sem] < secs["SkipPipe's plan"][sem]
        assert math.isclose(figures["ratio_vs_skippipe"][sem], secs["ours"][sem] / secs["SkipPipe's plan"][sem])
    # Planning for a semantics pays off under it; the semantics change the figures.
    planned_sp = secs["ours, planned for SkipPipe's semantics"]
    assert planned_sp["skippipe"] < secs["ours"]["skippipe"] and secs["ours"]["runtime"] < planned_sp["runtime"]
    assert secs["SkipPipe's plan"]["runtime"] != secs["SkipPipe's plan"]["skippipe"]
    assert 0 < figures["planning_cpu_s"] and 0 < figures["planning_wall_s"]
    report = (out / "planner.md").read_text()
    assert f"| ours | {secs['ours']['runtime']:.1f} |" in report and "| 20 | 30 |" in report
    assert (out / "planner-gantt.png").stat().st_size > 0
