"""Smoke test for bench/bench_compression.py: a two-step run writes the report and the --json layout
the issue asks for, with bytes measured through protocol/codecs.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_compression.py"


def test_tiny_run_writes_table_plot_and_json(tmp_path):
    out = tmp_path / "results"
    args = ["--quick", "--steps", "2", "--seeds", "1", "--swarm-rounds", "0", "--out", str(out),
            "--json", str(tmp_path / "c.json")]  # the swarm runs are bench_swarm's harness, tested there
    result = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "c.json").read_text())
    assert list(report) == ["raw", "int8", "int4", "lowrank+int8", "lowrank+int4", "control"]
    for name, entry in report.items():
        assert {"bytes_per_hop", "final_loss", "loss_ratio_ci"} <= entry.keys()
        assert entry["final_loss"] > 0
    assert report["control"]["codec"] == "sign1"
    assert report["control"]["bytes_per_hop"] == 2 * ((4 * 128 * 64 + 7) // 8 + 4)  # 1 bit a value, one scale
    elements = 4 * 128 * 64  # the bench's microbatch: 4 x 128 tokens of the tiny preset's 64 dims
    assert report["raw"]["bytes_per_hop"] == 2 * 4 * elements  # float32 forward and backward
    assert report["int8"]["bytes_per_hop"] == 2 * (elements + 4 * elements // 64)
    assert report["lowrank+int8"]["activation_ratio"] > 8
    assert (out / "compression.md").read_text().count("\n| `") == 6  # the five pairs and the control
    assert (out / "compression-loss.png").stat().st_size > 0
