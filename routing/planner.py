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

SIM_BUDGET = 30_000  # microbatch-simulations the search may spend: about 1000 evaluations at 30 microbatches


def default_evals(problem: Problem) -> int:
    return max(10, min(1000, SIM_BUDGET // problem.microbatches))


def plan(problem: Problem, *, seed: int = 0, evals: int | None = None) -> Plan:
    """A plan for one round. `evals` caps the simulations the local search runs (default: by size)."""
    t0 = time.perf_counter()
    stage = assign_stages(problem)
    paths, ids = construct(problem, stage)
    paths, sim = improve(problem, stage, paths, default_evals(problem) if evals is None else evals, seed)
    return Plan(
        stage_of_node=stage,
        paths=tuple(paths),
        mb_ids=tuple(ids),
        predicted_iteration_s=sim.makespan,
        predicted_end_s=tuple(sim.mb_end()),
        planner_wall_s=time.perf_counter() - t0,
    )
