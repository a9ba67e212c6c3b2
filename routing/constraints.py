"""The plan rules, one checker each. A checker returns a list of violations, empty when the plan is fine.

C1 check_endpoints  every microbatch starts and ends at its stage-0 node; each data node sends its share.
C2 check_visits     a path visits exactly L distinct stages on nodes that host them, stage 0 first.
C3 check_balance    stages 1..S-1 get visit counts that differ by at most one (equal when they can).
C4 check_swaps      going back is a swap: at most max_swap_depth behind the furthest stage reached,
                    at most max_swaps per path.
C5 check_memory     no node holds more microbatches than its memory slots at any time (from a simulation).
C6 check_waiting    the plan's predicted times are the simulator's, it does not deadlock, and waiting at busy
                    nodes is no worse than a reference plan's (the planner's start, or a baseline).
"""

from __future__ import annotations

import math
from collections import Counter

from routing.plan import Plan, replica_weights, stage_visits
from routing.problem import Problem
from routing.simulator import SimResult, simulate

REL_TOL = 1e-6


def order_violation(order: tuple[int, ...], max_swaps: int, max_depth: int) -> str | None:
    """Why a stage order (stage 0 excluded) breaks rule C4, or None."""
    furthest, swaps = 0, 0
    for s in order:
        if s < furthest:
            if furthest - s > max_depth:
                return f"stage {s} after stage {furthest} goes back more than {max_depth}"
            swaps += 1
        furthest = max(furthest, s)
    if swaps > max_swaps:
        return f"{swaps} swaps, more than {max_swaps}"
    return None


def check_endpoints(problem: Problem, plan: Plan) -> list[str]:
    out = []
    for mb, path in zip(plan.mb_ids, plan.paths):
        if not path or path[0] != path[-1]:
            out.append(f"microbatch {mb} does not return to where it started")
        elif plan.stage_of_node[path[0]] != 0:
            out.append(f"microbatch {mb} starts at node {problem.node_ids[path[0]]}, which is not a stage-0 node")
    sent = Counter(p[0] for p in plan.paths if p)
    for v, s in enumerate(plan.stage_of_node):
        if s == 0 and sent[v] != problem.microbatches_per_data_node:
            out.append(f"data node {problem.node_ids[v]} sends {sent[v]} microbatches, not {problem.microbatches_per_data_node}")
    if len(set(plan.mb_ids)) != len(plan.mb_ids):
        out.append("microbatch ids are not unique")
    return out


def check_visits(problem: Problem, plan: Plan) -> list[str]:
    out = []
    counts = tuple(plan.stage_of_node.count(s) for s in range(problem.stages))
    if counts != tuple(problem.stage_replicas):
        out.append(f"stage assignment has replicas {list(counts)}, the problem needs {list(problem.stage_replicas)}")
    if problem.stage_of_node is not None and tuple(plan.stage_of_node) != tuple(problem.stage_of_node):
        out.append("stage assignment differs from the problem's fixed one")
    for m, (mb, path) in enumerate(zip(plan.mb_ids, plan.paths)):
        if len(path) != problem.visits + 1:
            out.append(f"microbatch {mb} visits {len(path) - 1} stages, not {problem.visits}")
            continue
        stages = plan.stage_path(m)
        if stages[0] != 0 or 0 in stages[1:] or len(set(stages)) != len(stages):
            out.append(f"microbatch {mb} visits stages {list(stages)}: stage 0 first, then distinct stages")
    return out


def check_balance(problem: Problem, plan: Plan, reported_weights: dict[int, float] | None = None) -> list[str]:
    out = []
    counts = stage_visits(problem, plan)[1:]
    if counts and max(counts) - min(counts) > 1:
        out.append(f"stages 1..{problem.stages - 1} get unbalanced visits {counts}")
    if reported_weights is not None:
        for v, w in replica_weights(problem, plan).items():
            if not math.isclose(reported_weights.get(v, math.nan), w, rel_tol=REL_TOL, abs_tol=1e-12):
                out.append(f"node {problem.node_ids[v]} reports averaging weight {reported_weights.get(v)}, expected {w}")
    return out


def check_swaps(problem: Problem, plan: Plan) -> list[str]:
    out = []
    for m, mb in enumerate(plan.mb_ids):
        why = order_violation(plan.stage_path(m)[1:], problem.max_swaps, problem.max_swap_depth)
        if why:
            out.append(f"microbatch {mb}: {why}")
    return out


def peak_memory(problem: Problem, sim: SimResult) -> list[int]:
    """Most microbatches each node held at once: a slot is held from a forward start to its backward end."""
    edges: list[list[tuple[float, int]]] = [[] for _ in range(problem.n)]
    for nodes, start, end in zip(sim.nodes, sim.start, sim.end):
        L = (len(nodes) - 1) // 2
        for k in range(L):
            edges[nodes[k]].append((start[k], 1))
            edges[nodes[k]].append((end[2 * L - k], -1))
    peaks = []
    for ev in edges:
        cur = peak = 0
        for _, d in sorted(ev, key=lambda e: (e[0], e[1])):  # a release at t frees the slot for a start at t
            cur += d
            peak = max(peak, cur)
        peaks.append(peak)
    return peaks


def check_memory(problem: Problem, plan: Plan, sim: SimResult) -> list[str]:
    if sim.deadlock:
        return ["the plan deadlocks: microbatches wait on each other's memory slots"]
    return [
        f"node {problem.node_ids[v]} holds {p} microbatches, it has {problem.memory[v]} slots"
        for v, p in enumerate(peak_memory(problem, sim))
        if p > problem.memory[v]
    ]


def check_waiting(problem: Problem, plan: Plan, sim: SimResult, reference: SimResult | None = None) -> list[str]:
    out = []
    if sim.deadlock:
        return ["the plan deadlocks"]
    if not math.isclose(plan.predicted_iteration_s, sim.makespan, rel_tol=REL_TOL):
        out.append(f"predicted iteration {plan.predicted_iteration_s:.3f} s, the simulator says {sim.makespan:.3f} s")
    if plan.predicted_end_s and any(
        not math.isclose(a, b, rel_tol=REL_TOL) for a, b in zip(plan.predicted_end_s, sim.mb_end())
    ):
        out.append("predicted microbatch end times differ from the simulator's")
    if reference is not None and sim.makespan > reference.makespan * (1 + REL_TOL):
        out.append(f"iteration {sim.makespan:.3f} s is worse than the reference plan's {reference.makespan:.3f} s")
    return out


def check_plan(problem: Problem, plan: Plan, reference: SimResult | None = None) -> list[str]:
    """All six rules; simulates the plan once."""
    out = check_endpoints(problem, plan) + check_visits(problem, plan)
    if out:
        return out  # the rest assume well-formed paths
    out += check_balance(problem, plan) + check_swaps(problem, plan)
    sim = simulate(problem, plan.paths)
    return out + check_memory(problem, plan, sim) + check_waiting(problem, plan, sim, reference)
