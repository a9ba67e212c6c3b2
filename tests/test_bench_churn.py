"""Smoke test for bench/bench_churn.py: a short run kills a node while it holds activations, loses no round,
attributes the kill to the round it hit, and leaves no process behind."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_a_short_churn_run_kills_work_and_loses_nothing(tmp_path):
    # --seed 2: the first gap drawn is 5 rounds, so 6 churn rounds hold exactly one kill
    result = subprocess.run([sys.executable, str(REPO / "bench" / "bench_churn.py"), "--rounds", "6", "--seed", "2",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]  # no round lost, nothing left
    figures = json.loads((tmp_path / "churn.json").read_text())
    assert len(figures["kills"]) == 1 and figures["left"] == []
    kill = figures["kills"][0]
    rounds = {int(r): e for r, e in figures["rounds"].items()}
    assert figures["warm"] < kill["round"] <= figures["churn_end"]  # attributed to a churn round the data node ran
    assert kill["round"] in rounds and rounds[kill["round"]]["tokens"] == 4 * 8 * 128  # ... and it lost nothing
    assert max(rounds) >= figures["churn_end"] + 6  # then the soak ran
    report = (tmp_path / "churn.md").read_text()
    assert "| kills | 1 |" in report and "| processes left after stop | 0 |" in report
