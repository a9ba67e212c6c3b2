"""SkipPipe in the daemon, one real swarm on loopback: 4 stages, visits 3, one emulated slow link.

- every published plan passes routing's rule checkers against the problem its planner logged;
- once the link is measured, published plans avoid the slow link (another replica of stage 1 exists);
- the stages each node actually executed (counters at the nodes) match the plan;
- the swarm learns: its training loss ends below the unigram reference of the text it trains on (a cycle of 64
  distinct bytes, which a model passes only by learning which byte follows which).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest

from node.process.local_swarm import LocalSwarm, free_port
from node.control.planning import from_wire
from protocol.records import RoundPlan
from routing.constraints import check_plan
from routing.instance_io import problem_from_dict
from tests.helpers import run_cli, wait_for

pytestmark = pytest.mark.slow

ROUNDS = 10  # the tiny model passes the cycle's unigram level (ln 64) after about 6 steps, and is 2/3 of it at 10
SLOW_MS = 400.0


def _cycle(path):
    """A text whose bytes are 64 distinct symbols in one fixed order, repeated: unigram loss ln 64, and each byte
    determines the next. Returns (path, its unigram loss in nats per byte)."""
    symbols = [chr(c) for c in range(33, 127)]
    random.Random(1).shuffle(symbols)
    text = "".join(symbols[:64]) * 1024
    path.write_text(text)
    counts = Counter(text.encode())
    return path, -sum(n / len(text) * math.log(n / len(text)) for n in counts.values())


def _emulation(tmp_path, ports: dict[str, int], regions: dict[str, str]):
    fast = {"latency_ms": 0.5, "bandwidth_GiBps": 1.0}
    spec = {"nodes": [{"endpoint": f"127.0.0.1:{ports[n]}", "location": regions[n]} for n in ports],
            "links": [{"a": "slow-a", "b": "slow-b", "latency_ms": SLOW_MS, "bandwidth_GiBps": 1.0},
                      {"a": "slow-a", "b": "rest", **fast}, {"a": "slow-b", "b": "rest", **fast}],
            "same_location_link": fast}
    path = tmp_path / "links.json"
    path.write_text(json.dumps(spec))
    return path


def test_skip_swarm_plans_measures_and_executes(tmp_path):
    layout = {"d0": "0", "d1": "0", "a1": "1", "b1": "1", "s2": "2", "s3": "3"}
    ports = {name: free_port() for name in layout}
    regions = {n: "rest" for n in layout} | {"d0": "slow-a", "a1": "slow-b"}
    links = _emulation(tmp_path, ports, regions)
    text, unigram = _cycle(tmp_path / "cycle.txt")
    swarm = LocalSwarm(tmp_path, "skip", common_args=[
        "--num-stages", "4", "--visits", "3", "--microbatches", "3", "--rounds", "0",  # until stopped
        "--torch-threads", "1", "--device", "cpu", "--round-timeout", "60", "--links-refresh-rounds", "1", "--min-nodes", "6",
        "--emulate-links", str(links), "--data", str(text)])
    nodes = {}
    try:
        nodes["d0"] = swarm.start_node("d0", "0", extra=["--port", str(ports["d0"])])
        swarm.wait_started([nodes["d0"]], timeout=120)
        for name, stage in layout.items():
            if name != "d0":
                nodes[name] = swarm.start_node(name, stage, extra=["--port", str(ports[name])],
                                               initial_peers=swarm.initial_peers())
        swarm.wait_started(list(nodes.values()), timeout=180)
        wait_for(lambda: len(nodes["d0"].events("round")) >= 3, 240, "three rounds")
        status = run_cli("status", "--links", "--swarm", "skip", "--initial-peers", *swarm.initial_peers())
        wait_for(lambda: all(len(nodes[d].events("round")) >= ROUNDS for d in ("d0", "d1")), 300, "all rounds")
    finally:
        swarm.stop()

    peer = {name: node.started()["peer_id"] for name, node in nodes.items()}
    # `status --links`: the matrix, with the slow pair's RTT as d0 measured it (2 x 400 ms and a little).
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    header = next(line.split() for line in lines if line.startswith("from"))
    row = next(line.split() for line in lines if line.startswith(peer["d0"][-8:]))
    rtt_ms = float(row[header.index(peer["a1"][-8:]) - 2].split("/")[0])  # header starts "from \ to"
    assert 2 * SLOW_MS <= rtt_ms < 4 * SLOW_MS, status.stdout
    assert "directed pairs measured" in status.stdout
    # ... and, per link, the bytes its sender's calls moved by kind: d0's hops carried activations.
    moved = [line for line in lines if line.strip().startswith(f"{peer['d0'][-8:]} -> ")]
    assert moved and any(float(line.split("activations ")[1].split(",")[0]) > 0 for line in moved
                         if "activations " in line), status.stdout
    planned = {e["round"]: e for n in nodes.values() for e in n.events("planned")}
    executed = {n: {e["round"]: e for e in node.events("round")} for n, node in nodes.items()}
    slow_pair = {peer["d0"], peer["a1"]}
    measured_rounds = 0
    for round_ in range(ROUNDS):
        wire = RoundPlan.from_value(executed["d0"][round_]["plan"])  # the plan as fetched from the DHT
        problem = problem_from_dict(planned[round_]["problem"])
        assert check_plan(problem, from_wire(problem, wire)) == [], round_

        # Visits from execution: each node's backward counters, per stage, equal what the plan gave it.
        for name, node_events in executed.items():
            if round_ not in node_events:
                continue  # a node that joined after this round was planned
            given = Counter(h.stage for mb in wire.microbatches for h in mb.path[:-1] if h.peer_id == peer[name])
            done = {int(s): c for s, c in node_events[round_]["counts"].items() if c}
            assert done == dict(given), (round_, name, done, given)

        ids = problem.node_ids
        slow_link_s = max(problem.link_s[i, j] for i, a in enumerate(ids) for j, b in enumerate(ids)
                          if {a.split("/")[0], b.split("/")[0]} == slow_pair)
        if slow_link_s < SLOW_MS / 1000 / 4:
            continue  # not measured yet when this round was planned
        measured_rounds += 1
        for mb in wire.microbatches:
            for x, y in zip(mb.path, mb.path[1:]):
                assert {x.peer_id, y.peer_id} != slow_pair, (round_, mb)
    assert measured_rounds >= 3, f"the slow link was measured in time for only {measured_rounds} plans"

    rounds = [executed[d][r] for d in ("d0", "d1") for r in range(ROUNDS)]
    assert all(e["failed"] == 0 for e in rounds)
    losses = [sum(executed[d][r]["loss"] for d in ("d0", "d1")) / 2 for r in range(ROUNDS)]
    assert losses[0] > unigram and losses[-1] < unigram, (unigram, losses)
