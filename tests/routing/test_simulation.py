"""The simulator against bounds it can never beat, and against hand-computed timings."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
from hypothesis import given, settings

from routing.baselines import random_skip
from routing.instance_io import load_instance, load_plan
from routing.planner import plan
from routing.problem import Problem
from routing.order import FORWARD, queue_key, step_kind
from routing.semantics import RUNTIME, SEMANTICS, SKIPPIPE, Semantics
from routing.simulator import lower_bounds, simulate
from tests.routing.strategies import problems

GCP = Path(__file__).resolve().parents[2] / "bench" / "instances" / "gcp12-20nodes.json"


@settings(max_examples=30, deadline=None)
@given(problems())
def test_makespan_respects_lower_bounds(problem):
    for p, semantics in [(p, s) for p in (plan(problem, seed=0, evals=5), random_skip(problem, seed=0))
                         for s in SEMANTICS.values()]:
        sim = simulate(problem, p.paths, semantics)
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


def test_runtime_semantics_are_the_default_and_the_executors_policy():
    from node.stage import compute  # the executor's worker ranks hops with this key

    problem = load_instance(GCP)
    paths = load_plan(problem, GCP.with_name("gcp12-20nodes.skippipe-plan.json")).paths
    assert RUNTIME.key is queue_key and compute.queue_key is queue_key
    assert simulate(problem, paths).makespan == simulate(problem, paths, RUNTIME).makespan
    assert simulate(problem, paths, SKIPPIPE).makespan != simulate(problem, paths).makespan


def _runs(problem, paths, semantics):
    """Per node, its steps as (start, ready, kind), in the order they ran."""
    sim = simulate(problem, paths, semantics)
    per: dict[int, list] = {}
    L = problem.visits
    for m, nodes in enumerate(sim.nodes):
        for s, v in enumerate(nodes):
            per.setdefault(v, []).append((sim.start[m][s], sim.ready[m][s], step_kind(s, L)))
    return [sorted(steps) for steps in per.values()]


def test_runtime_runs_no_forward_while_a_backward_waits_and_fcfs_serves_in_arrival_order():
    problem = load_instance(GCP)
    roomy = dataclasses.replace(problem, memory=np.full(problem.n, 100))  # no step waits for memory
    paths = plan(problem, seed=0, evals=50).paths
    overtaken = 0
    for steps in _runs(roomy, paths, RUNTIME):
        for i, (start, _, kind) in enumerate(steps):
            if kind == FORWARD:
                # no later-starting loss or backward step was already waiting when this forward started
                assert not [s for s in steps[i + 1:] if s[2] != FORWARD and s[1] < start - 1e-9]
    for steps in _runs(roomy, paths, SKIPPIPE):
        for i, (start, ready, kind) in enumerate(steps):
            later = [s for s in steps[i + 1:] if s[1] < ready - 1e-9 and s[1] < start - 1e-9]
            assert not later  # nobody who was waiting since before this step arrived ran after it
    for steps in _runs(roomy, paths, RUNTIME):  # the two policies do differ on this plan
        overtaken += sum(1 for i, (start, ready, kind) in enumerate(steps)
                         if any(s[1] < ready and s[1] < start for s in steps[i + 1:]))
    assert overtaken > 0


def test_skippipe_semantics_stagger_agents_and_rest_nodes_between_steps():
    problem = _line(2, memory=2)
    paths = [(0, 1, 0)] * 4  # one origin, two memory slots: two agents, microbatches 0 and 2 on agent 0
    run = simulate(problem, paths, RUNTIME)
    assert run.ready[1][0] == 0.0 and math.isclose(run.start[1][0], 2.0)  # right after microbatch 0's forward
    sk = simulate(problem, paths, SKIPPIPE)
    assert math.isclose(sk.ready[1][0], 2.0)  # agent 1 releases one forward time later
    assert math.isclose(sk.start[1][0], 2.0 + SKIPPIPE.idle_gap_s)  # the origin rests after microbatch 0's forward
    # an agent keeps one microbatch in flight: microbatch 2 is released when microbatch 0 is done
    assert math.isclose(sk.ready[2][0], sk.end[0][-1]) and math.isclose(sk.ready[3][0], sk.end[1][-1])
    assert sk.makespan > run.makespan
    gap_only = Semantics("gap", queue_key, staggered=False, idle_gap_s=0.5)
    assert math.isclose(simulate(problem, paths, gap_only).start[1][0], 2.5)
