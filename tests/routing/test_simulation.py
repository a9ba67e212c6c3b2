"""The simulator against bounds it can never beat, and against hand-computed timings."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings

from routing.baselines import random_skip
from routing.planner import plan
from routing.problem import Problem
from routing.simulator import lower_bounds, simulate
from tests.routing.strategies import problems


@settings(max_examples=30, deadline=None)
@given(problems())
def test_makespan_respects_lower_bounds(problem):
    for p in (plan(problem, seed=0, evals=5), random_skip(problem, seed=0)):
        sim = simulate(problem, p.paths)
        bounds = lower_bounds(problem, p.paths)
        assert sim.makespan >= bounds["work"] - 1e-9
        assert sim.makespan >= bounds["path"] - 1e-9
        assert sim.makespan >= bounds["memory"] - 1e-9
        # Busy time is exactly the work handed out, and no node is busy longer than the round.
        assert math.isclose(sim.busy.sum(), _work(problem, p.paths), rel_tol=1e-9)
        assert np.all(sim.idle >= -1e-9)


def _work(problem, paths) -> float:
    fwd, bwd, loss = problem.forward_s, problem.backward_s(), problem.loss_s()
    return sum(fwd[v] + bwd[v] for p in paths for v in p[:-1]) + sum(loss[p[0]] for p in paths)


def _line(n: int, memory: int = 2) -> Problem:
    link = np.full((n, n), 0.5)
    np.fill_diagonal(link, 0.0)
    return Problem(
        node_ids=tuple(f"n{i}" for i in range(n)),
        forward_s=np.full(n, 2.0),
        memory=np.full(n, memory),
        link_s=link,
        stages=n,
        visits=n,
        stage_replicas=(1,) * n,
        microbatches_per_data_node=1,
        stage_of_node=tuple(range(n)),
    )


def test_one_microbatch_runs_its_critical_path():
    problem = _line(3)
    sim = simulate(problem, [(0, 1, 2, 0)])
    # fwd 3 x 2 + loss 0.5 + bwd 3 x 3, plus 6 links of 0.5
    assert math.isclose(sim.makespan, 6 + 0.5 + 9 + 3.0)
    assert sim.collisions == 0 and sim.waiting_s == 0
    # Backward retraces the forward path: node 2 runs its backward right after the loss message arrives.
    assert sim.nodes[0] == [0, 1, 2, 0, 2, 1, 0]
    assert math.isclose(sim.start[0][4], 6 + 3 * 0.5 + 0.5 + 0.5)  # 3 forwards, 3 links, loss, 1 link


def test_one_slot_serialises_microbatches_and_counts_the_wait():
    problem = _line(2, memory=1)
    sim = simulate(problem, [(0, 1, 0), (0, 1, 0)])
    one = simulate(problem, [(0, 1, 0)]).makespan
    # With one slot at the origin the second microbatch starts only when the first is done.
    assert math.isclose(sim.makespan, 2 * one)
    assert sim.collisions >= 1 and math.isclose(sim.wait[0], one)
