"""Re-planning when nodes leave or join: repair the current plan instead of planning from scratch.

1. Stages: survivors keep theirs. Stages short of replicas take joiners first, then survivors from the
   stages with spare replicas (the ones that carried the fewest visits move).
2. Microbatches of surviving data nodes keep their paths; a new data node gets fresh microbatches, and a
   data node that left takes its microbatches with it.
3. Visit counts are re-balanced by swapping a surplus stage for a short one in paths that can take it.
4. Every microbatch that lost a hop, changed stages, or is new is re-planned (best response against the
   load of the untouched ones), then a short local search polishes around them.
"""

from __future__ import annotations

import random
import time

import numpy as np

from routing.construct import stage_quotas
from routing.plan import Plan
from routing.problem import Problem
from routing.search import Mover, improve

REPAIR_EVALS = 40  # local-search simulations after the repair: keeps 20 nodes well under 100 ms


def _stages_for(old: Problem, plan: Plan, new: Problem) -> tuple[int, ...]:
    if new.stage_of_node is not None:
        return tuple(new.stage_of_node)
    stage = [-1] * new.n
    visits = [0] * new.n
    for k, i in enumerate(new.node_ids):
        if old.index(i, -1) >= 0:
            stage[k] = plan.stage_of_node[old.index(i)]
    for path in plan.paths:
        for v in path[:-1]:
            if new.index(old.node_ids[v], -1) >= 0:
                visits[new.index(old.node_ids[v])] += 1
    need = [r - stage.count(s) for s, r in enumerate(new.stage_replicas)]
    free = [k for k in range(new.n) if stage[k] < 0]  # joiners
    for s in range(new.stages):  # surplus survivors (least used first) join the free pool
        spare = sorted((k for k in range(new.n) if stage[k] == s), key=lambda k: (visits[k], k))
        free += spare[: max(0, -need[s])]
    for s in range(new.stages):
        for _ in range(max(0, need[s])):
            stage[free.pop(0)] = s
    return tuple(stage)


def repair(old: Problem, plan: Plan, new: Problem, *, seed: int = 0, evals: int = REPAIR_EVALS) -> Plan:
    """Adapt `plan` (made for `old`) to `new`, which shares node ids with `old` where nodes stayed."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    stage = _stages_for(old, plan, new)
    mover = Mover(new, stage, rng)
    replicas = mover.replicas
    per = new.microbatches_per_data_node

    def moved(v: int) -> int:
        """The old node's index in `new`, or -1 when it left or now hosts another stage."""
        k = new.index(old.node_ids[v], -1)
        return k if k >= 0 and stage[k] == plan.stage_of_node[v] else -1

    paths: list[tuple[int, ...]] = []
    ids: list[int] = []
    sets: list[set[int]] = []
    redo: set[int] = set()
    for mb, path in zip(plan.mb_ids, plan.paths):
        origin = moved(path[0])
        if origin < 0:
            continue
        hops = [moved(v) for v in path[1:-1]]
        sets.append({plan.stage_of_node[v] for v in path[1:-1]})
        if min(hops) < 0:  # a hop left: any replica of that stage for now, re-planned below
            redo.add(len(paths))
            hops = [h if h >= 0 else replicas[plan.stage_of_node[v]][0] for h, v in zip(hops, path[1:-1])]
        paths.append((origin, *hops, origin))
        ids.append(mb)
    next_id = max(plan.mb_ids, default=-1) + 1
    for d in replicas[0]:  # data nodes without microbatches (new ones) get theirs
        for _ in range(per - sum(p[0] == d for p in paths)):
            redo.add(len(paths))
            paths.append((d,) * (new.visits + 1))
            ids.append(next_id)
            sets.append(set())
            next_id += 1
    quota = stage_quotas(new, stage, len(paths))
    _rebalance(sets, quota, new.visits - 1, redo, rng)
    if redo:  # re-plan the broken and new microbatches against everyone else
        ms = sorted(redo)
        change = mover.reroute(paths, ms, [frozenset(sets[m]) for m in ms])
        for m, p in change.items():
            paths[m] = p
    paths, sim = improve(new, stage, paths, evals, seed, mover=mover)
    return Plan(stage, tuple(paths), tuple(ids), sim.makespan, tuple(sim.mb_end()), time.perf_counter() - t0)


def _rebalance(sets: list[set[int]], quota: list[int], size: int, redo: set[int], rng: random.Random) -> None:
    """Make the stage sets meet `quota`: fill the empty sets (new microbatches), then trade surplus stages
    for short ones inside existing sets. Changed microbatches are added to `redo`."""
    count = np.zeros(len(quota), dtype=int)
    for st in sets:
        for s in st:
            count[s] += 1
    for m, st in enumerate(sets):
        if st:
            continue
        short = np.argsort(count - np.array(quota), kind="stable")
        short = [int(s) for s in short if s != 0][:size]
        st.update(short)
        count[short] += 1
    surplus = [s for s in range(1, len(quota)) for _ in range(max(0, count[s] - quota[s]))]
    lacking = [s for s in range(1, len(quota)) for _ in range(max(0, quota[s] - count[s]))]
    for s, t in zip(surplus, lacking):
        cands = [m for m, st in enumerate(sets) if s in st and t not in st]
        m = min(cands, key=lambda m: (m not in redo, rng.random()))
        sets[m].remove(s)
        sets[m].add(t)
        redo.add(m)
