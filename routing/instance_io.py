"""Reading benchmark instances and reading/writing plans in the shared schedule format (bench/README.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from routing.plan import Plan, replica_weights, stage_visits
from routing.problem import Problem, ProblemError, link_time

GIB = 1024**3


def _get(d: dict, dotted: str) -> Any:
    cur: Any = d
    for key in dotted.split("."):
        if not isinstance(cur, dict) or key not in cur:
            raise ProblemError(f"instance is missing '{dotted}'")
        cur = cur[key]
    return cur


def _read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise ProblemError(f"cannot read it: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ProblemError(f"not valid JSON (line {e.lineno}: {e.msg})") from None


def problem_from_instance(inst: dict) -> Problem:
    """An instance dict (the format of bench/instances/*.json) as a Problem, using its cost_model."""
    if not isinstance(inst, dict):
        raise ProblemError("instance must be a JSON object")
    nodes = _get(inst, "nodes")
    if not isinstance(nodes, list) or not nodes:
        raise ProblemError("instance has no nodes")
    model, work = _get(inst, "model"), _get(inst, "workload")
    samples = _get(inst, "workload.samples_per_microbatch")
    layers = _get(inst, "model.layers_per_stage")
    nbytes = (
        _get(inst, "model.activation_bytes_per_element") * _get(inst, "model.d_model") * _get(inst, "model.context") * samples
    )
    overhead = float(_get(inst, "cost_model.fixed_overhead_s"))
    try:
        ids = [nd["id"] for nd in nodes]
        locs = [str(nd["location"]) for nd in nodes]
        fwd = np.array([nd["compute_s_per_sample_per_layer"] * layers * samples for nd in nodes], dtype=float)
        mem = np.array([nd.get("memory_microbatches", inst.get("memory_microbatches_per_node")) for nd in nodes])
    except (KeyError, TypeError) as e:
        raise ProblemError(f"every node needs 'id', 'location' and 'compute_s_per_sample_per_layer' ({e})") from None
    if any(m is None for m in mem):
        raise ProblemError("instance is missing 'memory_microbatches_per_node'")
    pair: dict[frozenset, float] = {}
    for lk in _get(inst, "links"):
        try:
            t = link_time(lk["latency_ms"] / 1000, lk["bandwidth_GiBps"] * GIB, nbytes, overhead)
            pair[frozenset((lk["a"], lk["b"]))] = t
        except (KeyError, TypeError):
            raise ProblemError(f"link entry {lk} needs 'a', 'b', 'latency_ms' and 'bandwidth_GiBps'") from None
    same = inst.get("same_location_link")
    n = len(nodes)
    link = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            if locs[i] == locs[j]:
                if same is None:
                    raise ProblemError(f"nodes {ids[i]} and {ids[j]} share '{locs[i]}' but there is no same_location_link")
                t = link_time(same["latency_ms"] / 1000, same["bandwidth_GiBps"] * GIB, nbytes, overhead)
            else:
                t = pair.get(frozenset((locs[i], locs[j])))
                if t is None:
                    raise ProblemError(f"no link between locations '{locs[i]}' and '{locs[j]}'")
            link[i, j] = link[j, i] = t
    fixed = [nd.get("stage") for nd in nodes]
    skip = _get(inst, "skip")
    return Problem(
        node_ids=tuple(ids),
        forward_s=fwd,
        memory=mem.astype(int),
        link_s=link,
        stages=int(_get(model, "stages")),
        visits=int(_get(skip, "stages_visited_per_microbatch")),
        stage_replicas=tuple(int(x) for x in _get(work, "stage_replicas")),
        microbatches_per_data_node=int(_get(work, "microbatches_per_data_node")),
        stage_of_node=tuple(fixed) if all(f is not None for f in fixed) else None,
        max_swaps=int(skip.get("max_swaps_per_path", 2)),
        max_swap_depth=int(skip.get("max_swap_depth", 1)),
        name=str(inst.get("name", "instance")),
        locations=tuple(locs),
    )


def load_instance(path: str | Path) -> Problem:
    return problem_from_instance(_read_json(path))


def plan_to_dict(problem: Problem, plan: Plan) -> dict:
    """The schedule format: node ids as the problem spells them, plus visit counts and averaging weights."""
    ids = problem.node_ids
    weights = replica_weights(problem, plan)
    return {
        "stage_of_node": {str(ids[v]): s for v, s in enumerate(plan.stage_of_node)},
        "microbatches": [
            {"id": mb, "path": [ids[v] for v in path], **({"predicted_end_s": plan.predicted_end_s[k]} if plan.predicted_end_s else {})}
            for k, (mb, path) in enumerate(zip(plan.mb_ids, plan.paths))
        ],
        "predicted_iteration_s": plan.predicted_iteration_s,
        "planner_wall_s": plan.planner_wall_s,
        "stage_visits": stage_visits(problem, plan),
        "replica_weights": {str(ids[v]): w for v, w in weights.items()},
    }


def plan_from_dict(problem: Problem, d: dict) -> Plan:
    """Parse a schedule; refuses node ids the problem does not know. Derived fields (weights) are recomputed."""
    by_str = {str(i): k for k, i in enumerate(problem.node_ids)}

    def node(x: Any) -> int:
        if str(x) not in by_str:
            raise ProblemError(f"plan names node {x!r}, which is not in the problem")
        return by_str[str(x)]

    try:
        stage = [None] * problem.n
        for k, s in d["stage_of_node"].items():
            stage[node(k)] = int(s)
        if any(s is None for s in stage):
            missing = [problem.node_ids[v] for v, s in enumerate(stage) if s is None]
            raise ProblemError(f"plan gives no stage for nodes {missing}")
        mbs = d["microbatches"]
        ends = tuple(float(mb["predicted_end_s"]) for mb in mbs) if all("predicted_end_s" in mb for mb in mbs) else ()
        return Plan(
            stage_of_node=tuple(stage),
            paths=tuple(tuple(node(x) for x in mb["path"]) for mb in mbs),
            mb_ids=tuple(int(mb["id"]) for mb in mbs),
            predicted_iteration_s=float(d.get("predicted_iteration_s", 0.0)),
            predicted_end_s=ends,
            planner_wall_s=float(d.get("planner_wall_s", 0.0)),
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise ProblemError(f"plan is not in the schedule format (missing or bad {e})") from None


def load_plan(problem: Problem, path: str | Path) -> Plan:
    return plan_from_dict(problem, _read_json(path))


def save_plan(problem: Problem, plan: Plan, path: str | Path) -> None:
    Path(path).write_text(json.dumps(plan_to_dict(problem, plan), indent=1) + "\n")


def problem_to_dict(problem: Problem) -> dict:
    """Everything the simulator and checkers read, as JSON-able data (the daemon logs the problems it planned)."""
    return {"node_ids": list(problem.node_ids), "forward_s": problem.forward_s.tolist(),
            "memory": problem.memory.tolist(), "link_s": problem.link_s.tolist(), "stages": problem.stages,
            "visits": problem.visits, "stage_replicas": list(problem.stage_replicas),
            "microbatches_per_data_node": problem.microbatches_per_data_node,
            "stage_of_node": None if problem.stage_of_node is None else list(problem.stage_of_node),
            "max_swaps": problem.max_swaps, "max_swap_depth": problem.max_swap_depth}


def problem_from_dict(d: dict) -> Problem:
    try:
        return Problem(node_ids=tuple(d["node_ids"]), forward_s=np.array(d["forward_s"], dtype=float),
                       memory=np.array(d["memory"], dtype=int), link_s=np.array(d["link_s"], dtype=float),
                       stages=int(d["stages"]), visits=int(d["visits"]),
                       stage_replicas=tuple(int(x) for x in d["stage_replicas"]),
                       microbatches_per_data_node=int(d["microbatches_per_data_node"]),
                       stage_of_node=None if d["stage_of_node"] is None else tuple(d["stage_of_node"]),
                       max_swaps=int(d["max_swaps"]), max_swap_depth=int(d["max_swap_depth"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ProblemError(f"problem is not in the expected format (missing or bad {e})") from None
