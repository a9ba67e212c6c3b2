"""`swarm-node demo`, as the README runs it: it trains, summarises, and leaves nothing running."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.helpers import REPO, alive, descendants, wait_for

pytestmark = pytest.mark.slow


def _demo(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "node", "demo", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _watch_descendants(process: subprocess.Popen, until_line: str) -> tuple[set[int], list[str]]:
    """Read the demo's output until `until_line` appears, noting every process it started on the way."""
    seen, lines = set(), []
    for line in process.stdout:
        lines.append(line)
        seen |= descendants(process.pid)
        if until_line in line:
            break
    return seen, lines


def test_readme_demo_trains_and_exits_clean(tmp_path):
    summary = tmp_path / "summary.json"
    demo = _demo("--rounds", "3", "--summary-json", str(summary), "--workdir", str(tmp_path / "work"),
                 "--visits", "3", "--emulate-links", "bench/instances/gcp12-20nodes.json")  # as the README runs it
    children, lines = _watch_descendants(demo, "round   3/3")
    rest = demo.communicate(timeout=120)[0]
    assert demo.returncode == 0, "".join(lines) + rest
    result = json.loads(summary.read_text())
    assert result["rounds"] == 3 and len(result["loss_per_round"]) == 3
    assert result["tokens"] > 0 and len(result["nodes"]) == 6
    assert all(n["metrics_url"].startswith("http://127.0.0.1:") for n in result["nodes"])
    assert any("metrics http://127.0.0.1:" in line for line in lines)
    assert len(children) >= 12  # six nodes, each with at least a DHT process and a p2pd
    progress = [re.search(r"iteration ([\d.]+)s \(predicted ([\d.]+)s\), round ([\d.]+)s \(predicted ([\d.]+)s\) "
                          r"\| visits (\d+),(\d+),(\d+),(\d+)", line) for line in lines if line.startswith("round ")]
    assert len(progress) == 3 and all(progress), lines
    for m in progress:  # executed visits: 2 data nodes x 4 microbatches, each visiting 2 of stages 1..3
        assert int(m[5]) == 8 and sum(map(int, m.groups()[5:])) == 16, m[0]
        assert all(float(x) > 0 for x in m.groups()[:4]), m[0]
        # the whole round holds the iteration and more, measured and predicted (two stages have two replicas)
        assert float(m[3]) >= float(m[1]) and float(m[4]) >= float(m[2]), m[0]
    # by the third round the planner has measured its own overhead (it ran rounds 0 and 1 back to back)
    assert float(progress[-1][4]) > float(progress[-1][2]), progress[-1][0]
    # Each round's printed prediction is routing's simulation of the plan the round ran, over the problem the
    # planner saw (its `planned` event): the same numbers, not a second estimate.
    simulated = _simulated_rounds(tmp_path / "work")
    assert sorted(simulated) == [0, 1, 2], simulated
    for r, m in enumerate(progress):
        assert float(m[2]) == pytest.approx(simulated[r], abs=0.01), (r, m[0], simulated[r])
    wait_for(lambda: not [p for p in children if alive(p)], 15, "every node process to exit")


def _simulated_rounds(workdir) -> dict[int, float]:
    """Round -> the simulator's iteration time for the plan a data node ran, over the planner's problem."""
    from node.control.planning import from_wire
    from protocol.records import RoundPlan
    from routing.instance_io import problem_from_dict
    from routing.simulator import simulate

    events = [json.loads(line) for path in sorted(workdir.glob("*.events.jsonl")) for line in path.read_text().splitlines()]
    problems = {e["round"]: problem_from_dict(e["problem"]) for e in events if e["event"] == "planned" and e["problem"]}
    plans = {e["round"]: RoundPlan.from_value(e["plan"]) for e in events if e["event"] == "round" and "plan" in e}
    return {r: simulate(problems[r], from_wire(problems[r], plans[r]).paths).makespan for r in plans if r in problems}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_demo_stops_every_node(tmp_path, sig):
    demo = _demo("--rounds", "1000", "--layout", "0,1", "--workdir", str(tmp_path))
    children, _ = _watch_descendants(demo, "round   1/1000")
    demo.send_signal(sig)
    demo.communicate(timeout=60)
    assert demo.returncode != 0
    wait_for(lambda: not [p for p in children if alive(p)], 15, "every node process to exit")
