"""The planner: stage assignment, greedy paths, then local search judged by the simulator.

Why this algorithm (measured on gcp12-20nodes, see docs/routing.md): the greedy construction alone lands
near 79 s; random single-hop moves judged by the simulator stall near 72 s; adding best-response moves
(re-plan one or two microbatches against everyone else's load and memory use) reaches about 66 s within
~1000 simulations. Everything is seeded, and the search budget is a count of simulations, not wall time,
so a given input and seed always give the same plan.
"""

from __future__ import annotations

import time

from routing.assign import assign_stages
from routing.construct import construct
from routing.plan import Plan
from routing.problem import Problem
from routing.search import improve
from routing.semantics import RUNTIME, Semantics
from routing.simulator import simulate

SIM_BUDGET = 30_000  # microbatch-simulations the search may spend: about 1000 evaluations at 30 microbatches


def default_evals(problem: Problem) -> int:
    return max(10, min(1000, SIM_BUDGET // problem.microbatches))


def plan(problem: Problem, *, seed: int = 0, evals: int | None = None, semantics: Semantics = RUNTIME) -> Plan:
    """A plan for one round, judged under `semantics` (the runtime's by default: that is what the swarm executes).
    `evals` caps the simulations the local search runs (default: by size)."""
    t0 = time.perf_counter()
    stage = assign_stages(problem)
    paths, ids = construct(problem, stage)
    paths, sim = improve(problem, stage, paths, default_evals(problem) if evals is None else evals, seed,
                         semantics=semantics)
    return Plan(
        stage_of_node=stage,
        paths=tuple(paths),
        mb_ids=tuple(ids),
        predicted_iteration_s=sim.makespan,
        predicted_end_s=tuple(sim.mb_end()),
        planner_wall_s=time.perf_counter() - t0,
    )


def cover_replicas(problem: Problem, plan: Plan) -> Plan:
    """The plan with every replica of a stage serving at least one of the round's visits to that stage, where
    another replica serves two or more: of those replicas' hops, the one whose move to the idle replica
    leaves the shortest simulated round (then the earliest microbatch ends, summed) moves.

    A swarm wants this even when the search left a replica idle for a slightly faster round: an idle
    replica is not in the round, so it can take no re-routed microbatch when its twin dies, and it copies
    its stage's state after the round instead of training. The prediction is the moved plan's."""
    paths = [list(p) for p in plan.paths]
    load = [0] * problem.n
    for path in paths:
        for v in path[1:-1]:
            load[v] += 1
    moved = False
    for idle in range(problem.n):
        stage = plan.stage_of_node[idle]
        if stage == 0 or load[idle] or problem.memory[idle] < 1:
            continue
        hops = [(m, i) for m, path in enumerate(paths) for i, v in enumerate(path[1:-1], 1)
                if plan.stage_of_node[v] == stage and load[v] >= 2]
        if not hops:
            continue

        def cost_after(hop: tuple[int, int]) -> tuple[float, float]:
            m, i = hop
            trial = [list(p) for p in paths]
            trial[m][i] = idle
            sim = simulate(problem, trial)
            return sim.makespan, float(sum(sim.mb_end()))
        m, i = min(hops, key=cost_after)
        load[paths[m][i]] -= 1
        paths[m][i] = idle
        load[idle] += 1
        moved = True
    if not moved:
        return plan
    sim = simulate(problem, paths)
    return Plan(stage_of_node=plan.stage_of_node, paths=tuple(tuple(p) for p in paths), mb_ids=plan.mb_ids,
                predicted_iteration_s=sim.makespan, predicted_end_s=tuple(sim.mb_end()),
                planner_wall_s=plan.planner_wall_s)
