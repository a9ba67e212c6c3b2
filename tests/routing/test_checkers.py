"""Every plan the planner, the baselines or the repair produce passes every checker; broken plans are caught."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings

from routing.baselines import random_skip
from routing.constraints import (
    check_balance,
    check_endpoints,
    check_memory,
    check_plan,
    check_swaps,
    check_visits,
    check_waiting,
    order_violation,
)
from routing.planner import plan
from routing.repair import repair
from routing.simulator import simulate
from routing.synthetic import drop_nodes, generate
from tests.routing.strategies import problems

FAST = settings(max_examples=25, deadline=None)


@FAST
@given(problems())
def test_planner_plans_pass_every_checker(problem):
    result = plan(problem, seed=1, evals=30)
    start = random_skip(problem, seed=1)
    assert check_plan(problem, result) == []
    assert check_plan(problem, start) == []


@FAST
@given(problems())
def test_repaired_plans_pass_every_checker(problem):
    result = plan(problem, seed=0, evals=10)
    stage_nodes = [i for v, i in enumerate(problem.node_ids) if result.stage_of_node[v] and
                   problem.stage_replicas[result.stage_of_node[v]] > 1]
    if not stage_nodes:
        return
    smaller = drop_nodes(problem, result, stage_nodes[:1])
    fixed = repair(problem, result, smaller, evals=10)
    assert check_plan(smaller, fixed) == []


def test_swap_rule():
    assert order_violation((1, 2, 3), 0, 1) is None
    assert order_violation((2, 1, 4, 3), 2, 1) is None
    assert "more than 1" in order_violation((3, 1, 2), 2, 1)
    assert order_violation((3, 1, 2), 2, 2) is None
    assert "2 swaps" in order_violation((2, 1, 4, 3), 1, 1)
    assert "1 swaps" in order_violation((2, 1), 0, 1)


def _base():
    problem = generate(12, seed=3)
    return problem, plan(problem, seed=0, evals=5)


def test_checkers_catch_broken_plans():
    problem, good = _base()
    assert check_plan(problem, good) == []
    paths = list(good.paths)

    bad = dataclasses.replace(good, paths=(paths[0][:-1] + (paths[1][0] if paths[1][0] != paths[0][0] else paths[0][1],),) + tuple(paths[1:]))
    assert check_endpoints(problem, bad)

    p0 = paths[0]
    dup = dataclasses.replace(good, paths=((p0[0], p0[1], p0[1], *p0[3:]),) + tuple(paths[1:]))
    assert any("distinct" in v for v in check_visits(problem, dup))

    short = dataclasses.replace(good, paths=((p0[0], p0[1], p0[0]),) + tuple(paths[1:]))
    assert any(f"visits 2 stages, not {problem.visits}" in v for v in check_visits(problem, short))

    # Give every microbatch the same stages: visit counts go out of balance.
    same = dataclasses.replace(good, paths=tuple((p[0], *p0[1:-1], p[0]) for p in paths))
    assert check_balance(problem, same)

    # Reverse a path's hops: stage order goes back more than one stage.
    rev = dataclasses.replace(good, paths=((p0[0], *p0[-2:0:-1], p0[0]),) + tuple(paths[1:]))
    assert check_swaps(problem, rev)

    wrong = dataclasses.replace(good, predicted_iteration_s=good.predicted_iteration_s + 1)
    assert check_waiting(problem, wrong, simulate(problem, good.paths))


def test_memory_checker_counts_overlapping_holds():
    problem, good = _base()
    sim = simulate(problem, good.paths)
    assert check_memory(problem, good, sim) == []
    tight = dataclasses.replace(problem, memory=problem.memory * 0 + 1)
    # The same timings judged against one slot per node: overlaps the simulation allowed now violate.
    assert check_memory(tight, good, sim)


def test_reported_weights_must_match():
    problem, good = _base()
    from routing.plan import replica_weights

    w = replica_weights(problem, good)
    assert check_balance(problem, good, w) == []
    assert check_balance(problem, good, {**w, 0: w[0] + 0.5})
    for s in range(problem.stages):
        assert abs(sum(x for v, x in w.items() if good.stage_of_node[v] == s) - 1) < 1e-9


def test_planner_is_no_worse_than_random_skipping():
    problem = generate(20, seed=5)
    ours = plan(problem, seed=0, evals=100)
    rand = random_skip(problem, seed=0)
    assert check_waiting(problem, ours, simulate(problem, ours.paths), reference=simulate(problem, rand.paths)) == []
