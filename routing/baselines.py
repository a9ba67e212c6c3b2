"""Baselines run in the same simulator: the full pipeline and network-oblivious random skipping."""

from __future__ import annotations

import dataclasses
import random

import numpy as np

from routing.construct import all_orders, stage_quotas
from routing.plan import Plan
from routing.planner import plan
from routing.problem import Problem
from routing.simulator import simulate


def full_pipeline(problem: Problem, *, seed: int = 0, evals: int | None = None) -> Plan:
    """Every microbatch visits every stage in order, along the best chains our planner finds for that."""
    full = dataclasses.replace(problem, visits=problem.stages, max_swaps=0)
    return plan(full, seed=seed, evals=evals)


def random_skip(problem: Problem, *, seed: int = 0) -> Plan:
    """Network-oblivious skipping: random stage assignment, random valid paths with balanced visit counts."""
    rng = random.Random(seed)
    if problem.stage_of_node is None:
        roles = [s for s, r in enumerate(problem.stage_replicas) for _ in range(r)]
        rng.shuffle(roles)
        stage = tuple(roles)
    else:
        stage = tuple(problem.stage_of_node)
    replicas = [[v for v, s in enumerate(stage) if s == k] for k in range(problem.stages)]
    orders, member = all_orders(problem)
    data = replicas[0]
    per = problem.microbatches_per_data_node
    total = len(data) * per
    quota = np.array(stage_quotas(problem, stage, total))
    paths = []
    for k in range(total):
        allowed = ~(member & (quota == 0)).any(1) & member[:, quota == total - k].all(1)
        order = orders[rng.choice(np.flatnonzero(allowed).tolist())]
        quota[order] -= 1
        origin = data[k // per]
        paths.append((origin, *(rng.choice(replicas[s]) for s in order), origin))
    sim = simulate(problem, paths)
    return Plan(stage, tuple(paths), tuple(range(total)), sim.makespan, tuple(sim.mb_end()))
