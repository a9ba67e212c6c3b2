"""Re-routing around dead peers (routing's repair, then hop substitution) and the expected round time."""

from __future__ import annotations

from collections import Counter

from node.control.planning import plan_around_missing, plan_round
from node.faults.reroute import PathRepair, expected_round_seconds
from protocol.records import NodeRecord, NodeState


def record(peer: str, stages: tuple[int, ...], compute: float = 0.01) -> NodeRecord:
    return NodeRecord(peer_id=peer, endpoint=f"h:{peer}", stages=stages, compute_s={s: compute for s in stages},
                      memory_slots=8, role="data" if 0 in stages else "stage", version="t", swarm="s", round=0,
                      state=NodeState.SERVING)


def members(*specs):
    return {p: record(p, st) for p, st in specs}


def plan_for(m, round_, num_stages, visits, per_origin):
    return plan_round(m, {}, round_=round_, num_stages=num_stages, visits=visits, microbatches_per_origin=per_origin,
                      activation_bytes=1 << 16, planner="d0")[0]


def full_pipeline_plan(m, round_, num_stages, per_origin, planner):
    return plan_for(m, round_, num_stages, num_stages, per_origin)


def skip_plan(m, round_, num_stages, visits, per_origin, planner, activation_bytes):
    return plan_for(m, round_, num_stages, visits, per_origin)


def test_full_pipeline_moves_the_dead_replica_to_its_twin_and_keeps_balance():
    m = members(("d0", (0,)), ("a1", (1,)), ("b1", (1,)), ("c2", (2,)))
    plan = full_pipeline_plan(m, 3, 3, 4, "d0")
    rerouter = PathRepair(activation_bytes=1 << 16)
    broken = [mb.id for mb in plan.microbatches if any(h.peer_id == "a1" for h in mb.path)]
    assert broken
    paths = {mb: rerouter.path_for(plan, mb, frozenset({"a1"}), m) for mb in broken}
    for mb, path in paths.items():
        assert [h.stage for h in path] == [0, 1, 2, 0]
        assert "a1" not in {h.peer_id for h in path}
    # A stage with no replica left: a full pipeline cannot finish.
    assert rerouter.path_for(plan, plan.microbatches[0].id, frozenset({"c2"}), m) is None


def test_skip_plan_replaces_a_lost_stage_with_the_least_visited_one():
    m = members(("d0", (0,)), ("s1", (1,)), ("s2", (2,)), ("s3", (3,)))
    plan = skip_plan(m, 5, 4, 3, 3, "d0", 1 << 16)
    rerouter = PathRepair(activation_bytes=1 << 16)
    visits = Counter()
    for mb in plan.microbatches:
        path = rerouter.path_for(plan, mb.id, frozenset({"s2"}), m)
        stages = [h.stage for h in path]
        assert stages[0] == stages[-1] == 0 and 2 not in stages
        assert len(set(stages[1:-1])) == len(stages[1:-1])
        visits.update(stages[1:-1])
    assert visits[1] > 0 and visits[3] > 0


def test_expected_round_time_is_the_busiest_nodes_compute():
    m = members(("d0", (0,)), ("a1", (1,)), ("c2", (2,)))
    plan = full_pipeline_plan(m, 0, 3, 4, "d0")
    assert abs(expected_round_seconds(plan, m) - 4 * 0.01 * 2.5) < 1e-9


def test_repair_keeps_full_pipelines_in_stage_order():
    m = members(("d0", (0,)), ("a1", (1,)), ("b1", (1,)), ("c2", (2,)), ("e2", (2,)))
    plan = full_pipeline_plan(m, 1, 3, 6, "d0")
    rerouter = PathRepair(activation_bytes=1 << 16)
    for mb in plan.microbatches:
        path = rerouter.path_for(plan, mb.id, frozenset({"a1"}), m)
        assert [h.stage for h in path] == [0, 1, 2, 0] and path[1].peer_id == "b1"


def test_a_lost_stage_is_planned_around_and_paths_name_the_real_stages():
    m = members(("d0", (0,)), ("s1", (1,)), ("s3", (3,)))  # stage 2 is gone
    made = plan_around_missing(lambda nodes, stages, visits: plan_round(
        nodes, {}, round_=7, num_stages=stages, visits=visits, microbatches_per_origin=4, activation_bytes=1 << 16,
        planner="d0"), m, 4, 3, [2])
    plan, _ = made
    for mb in plan.microbatches:
        stages = [h.stage for h in mb.path]
        assert stages[0] == stages[-1] == 0 and 2 not in stages and len(stages) == 4
        assert {h.peer_id for h in mb.path[1:-1]} == {"s1", "s3"}
    assert plan_around_missing(lambda *a: None, m, 4, 3, [1, 2, 3]) is None  # only stage 0 left
