"""Instance files in, schedules out: round trips, the shared files, and clear refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from routing.constraints import check_balance, check_plan
from routing.instance_io import load_instance, load_plan, plan_from_dict, plan_to_dict, problem_from_instance
from routing.planner import plan
from routing.problem import LiveLink, LiveNode, ProblemError, from_live
from routing.simulator import simulate
from routing.synthetic import generate
from tests.helpers import run_cli

BENCH = Path(__file__).resolve().parents[2] / "bench" / "instances"
GCP = BENCH / "gcp12-20nodes.json"


def test_plan_round_trips_through_json():
    problem = generate(16, seed=2)
    p = plan(problem, seed=0, evals=20)
    text = json.dumps(plan_to_dict(problem, p))
    back = plan_from_dict(problem, json.loads(text))
    assert back == p
    d = json.loads(text)
    assert set(d) >= {"stage_of_node", "microbatches", "predicted_iteration_s", "planner_wall_s"}
    reported = {problem.index(int(k)): w for k, w in d["replica_weights"].items()}
    assert check_balance(problem, back, reported) == []


def test_string_node_ids_from_live_data():
    ids = ["peerA", "peerB", "peerC", "peerD"]
    nodes = [LiveNode(i, compute_s=1.0, memory=2) for i in ids]
    links = [LiveLink(a, b, rtt_s=0.02, bandwidth_Bps=1e8) for a in ids for b in ids if a < b]
    problem = from_live(nodes, links, stages=3, visits=2, activation_bytes=10**7, microbatches_per_data_node=2,
                        stage_replicas=[2, 1, 1])
    assert np.isclose(problem.link_s[0, 1], 0.01 + 0.1)
    p = plan(problem, seed=0, evals=10)
    assert check_plan(problem, p) == []
    d = plan_to_dict(problem, p)
    assert set(d["stage_of_node"]) == set(ids)
    assert all(isinstance(x, str) for mb in d["microbatches"] for x in mb["path"])
    assert plan_from_dict(problem, json.loads(json.dumps(d))) == p


def test_live_refusals():
    nodes = [LiveNode("a", 1.0, 2, stage=0), LiveNode("b", 1.0, 2, stage=1)]
    with pytest.raises(ProblemError, match="no usable link"):
        from_live(nodes, [], stages=2, visits=2, activation_bytes=1, microbatches_per_data_node=1)
    ok = from_live(nodes, [], stages=2, visits=2, activation_bytes=1, microbatches_per_data_node=1, missing_link_s=3.0)
    assert ok.stage_of_node == (0, 1) and ok.link_s[0, 1] == 3.0
    with pytest.raises(ProblemError, match="every node reports its stage or none"):
        from_live([nodes[0], LiveNode("b", 1.0, 2)], [], stages=2, visits=2, activation_bytes=1,
                  microbatches_per_data_node=1, missing_link_s=1.0)


def test_gcp_instance_and_skippipe_plan_load():
    problem = load_instance(GCP)
    assert problem.n == 20 and problem.stages == 6 and problem.visits == 4
    assert np.isclose(problem.forward_s[0], 0.055 * 4 * 8)
    # Belgium-Germany: 4 ms + 32 MiB at 0.2425 GiB/s + 0.35 s
    assert np.isclose(problem.link_s[1, 3], 0.004 + (32 / 1024) / 0.2425 + 0.35)
    skip = load_plan(problem, BENCH / "gcp12-20nodes.skippipe-plan.json")
    assert len(skip.paths) == 30
    assert [c for c in check_plan(problem, skip) if "predicted" not in c] == []


def _inst():
    return json.loads(GCP.read_text())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["links"].pop(0), "no link between locations 'Australia' and 'Belgium'"),
        (lambda d: d["workload"].update(stage_replicas=[5, 3, 3, 3, 3, 2]), "add up to 19, not to the 20 nodes"),
        (lambda d: d["workload"].update(stage_replicas=[5, 3, 3, 3, 3, 3, 0]), "7 entries for 6 stages"),
        (lambda d: d["skip"].update(stages_visited_per_microbatch=7), "must be in 2..6"),
        (lambda d: d.pop("cost_model"), "missing 'cost_model.fixed_overhead_s'"),
        (lambda d: d["nodes"][0].pop("location"), "needs 'id', 'location'"),
    ],
)
def test_bad_instances_are_refused(mutate, message):
    d = copy.deepcopy(_inst())
    mutate(d)
    with pytest.raises(ProblemError, match=message.replace("(", r"\(").replace(".", r"\.")):
        problem_from_instance(d)


def test_cli_refuses_bad_instance_in_one_line(tmp_path):
    d = _inst()
    d["skip"]["stages_visited_per_microbatch"] = 9
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    r = run_cli("plan", "--instance", str(bad))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith("swarm-node: error: ") and "must be in 2..6" in lines[0]


@pytest.mark.parametrize("name, text, message", [
    ("missing.json", None, "cannot read it"),
    ("junk.json", "{nope", "not valid JSON"),
    ("list.json", "[]", "must be a JSON object"),
])
def test_plan_command_raises_usage_errors(tmp_path, name, text, message):
    import argparse

    from node.commands import plan as command
    from node.errors import UsageError

    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    args = argparse.Namespace(instance=str(path), json=None, gantt=None, seed=0)
    with pytest.raises(UsageError, match=message):
        command.run(args)
    with pytest.raises(UsageError, match="png or .svg"):
        command.run(argparse.Namespace(instance=str(GCP), json=None, gantt="x.pdf", seed=0))


def test_cli_plans_and_writes_schedule_and_gantt(tmp_path):
    out, png = tmp_path / "plan.json", tmp_path / "gantt.png"
    r = run_cli("plan", "--instance", str(GCP), "--json", str(out), "--gantt", str(png), "--seed", "3")
    assert r.returncode == 0, r.stderr
    for key in ("predicted iteration", "full pipeline", "visits per stage", "peak memory", "collisions", "planner wall"):
        assert key in r.stdout
    problem = load_instance(GCP)
    p = load_plan(problem, out)
    assert check_plan(problem, p) == []
    assert np.isclose(simulate(problem, p.paths).makespan, p.predicted_iteration_s)
    assert png.read_bytes()[:4] == b"\x89PNG"
