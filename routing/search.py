"""Local search on paths with the simulator as judge.

A move changes one or two microbatches and keeps every rule: it either moves a hop to another replica of
the same stage, exchanges a visited stage between two microbatches (visit counts stay put), or toggles a
swap of two neighbouring stages in one path. Moves are aimed where they can pay off: at microbatches that
finish late and at hops on the nodes where steps waited longest. A move is kept when the iteration gets
shorter, or stays equal with less waiting.
"""

from __future__ import annotations

import random

import numpy as np

from routing.constraints import order_violation
from routing.construct import PathChooser, Pressure, all_orders
from routing.problem import Problem
from routing.semantics import RUNTIME, Semantics
from routing.simulator import SimResult, simulate

Paths = list[tuple[int, ...]]
RANDOM_REPLICA = 0.5  # chance a replica move picks any replica rather than one near the path
# Cumulative chances of: replica, exchange, toggle swap, reinsert (best response), exchange + best response.
MIX = (0.2, 0.4, 0.5, 0.75)
CRITICAL_ORIGIN = 0.8  # chance a move targets the origin that finishes last


def score(sim: SimResult) -> tuple[float, float]:
    return (round(sim.makespan, 9), round(sim.waiting_s, 9))


class Mover:
    def __init__(self, problem: Problem, stage_of_node: tuple[int, ...], rng: random.Random):
        self.p, self.stage, self.rng = problem, stage_of_node, rng
        self.replicas = [[v for v, s in enumerate(stage_of_node) if s == k] for k in range(problem.stages)]
        self.link = problem.link_s
        orders, member = all_orders(problem)
        self.chooser = PathChooser(problem, stage_of_node, orders, member)
        self.member = member
        self.pressure = Pressure(problem, stage_of_node)  # of the current paths; see track()

    def track(self, old: list[tuple[int, ...]], new: list[tuple[int, ...]]) -> None:
        """Keep the load picture in step with the paths the search holds (old paths out, new ones in)."""
        for path in old:
            self.pressure.add(path, -1)
        for path in new:
            self.pressure.add(path)

    def _stages(self, path: tuple[int, ...]) -> frozenset[int]:
        return frozenset(self.stage[v] for v in path[1:-1])

    def reroute(self, paths: Paths, ms: list[int], sets: list[frozenset[int]]) -> dict[int, tuple[int, ...]]:
        """Best-response: re-plan microbatches `ms` (visiting `sets`) against the load of all the others.
        Leaves the tracked load as it found it."""
        self.track([paths[m] for m in ms], [])
        new = {}
        for m, stages in zip(ms, sets):
            want = np.zeros(self.p.stages, dtype=bool)
            want[list(stages)] = True
            allowed = (self.member == want).all(1)
            _, hops = self.chooser.best(paths[m][0], self.pressure.costs(), allowed)
            new[m] = (paths[m][0], *hops, paths[m][0])
            self.track([], [new[m]])
        self.track(list(new.values()), [paths[m] for m in ms])
        return {m: p for m, p in new.items() if p != paths[m]}

    def reinsert(self, paths: Paths, m: int) -> dict[int, tuple[int, ...]]:
        return self.reroute(paths, [m], [self._stages(paths[m])])

    def exchange_best(self, paths: Paths, a: int, b: int) -> dict[int, tuple[int, ...]]:
        sa, sb = self._stages(paths[a]), self._stages(paths[b])
        give, take = sorted(sa - sb), sorted(sb - sa)
        if not give or not take:
            return {}
        s, t = self.rng.choice(give), self.rng.choice(take)
        return self.reroute(paths, [a, b], [sa - {s} | {t}, sb - {t} | {s}])

    def _ok(self, path: tuple[int, ...]) -> bool:
        order = tuple(self.stage[v] for v in path[1:-1])
        return order_violation(order, self.p.max_swaps, self.p.max_swap_depth) is None

    def _near(self, stage: int, before: int, after: int, avoid: int) -> int:
        """A replica of `stage`, usually among the ones closest to its neighbours in the path."""
        reps = [v for v in self.replicas[stage] if v != avoid] or self.replicas[stage]
        if self.rng.random() < RANDOM_REPLICA:
            return self.rng.choice(reps)
        cost = [self.link[before, v] + self.link[v, after] for v in reps]
        best = np.argsort(cost, kind="stable")[: 3]
        return reps[int(self.rng.choice(best))]

    def replica(self, paths: Paths, m: int, hop: int) -> dict[int, tuple[int, ...]]:
        path = list(paths[m])
        v = path[hop]
        path[hop] = self._near(self.stage[v], path[hop - 1], path[hop + 1], avoid=v)
        return {m: tuple(path)} if path[hop] != v else {}

    def exchange(self, paths: Paths, a: int, b: int) -> dict[int, tuple[int, ...]]:
        sa = {self.stage[v] for v in paths[a][1:-1]}
        sb = {self.stage[v] for v in paths[b][1:-1]}
        give, take = sorted(sa - sb), sorted(sb - sa)
        if not give or not take:
            return {}
        s, t = self.rng.choice(give), self.rng.choice(take)
        out = {}
        for m, old, new in ((a, s, t), (b, t, s)):
            hops = [v for v in paths[m][1:-1] if self.stage[v] != old]
            order = sorted([self.stage[v] for v in hops] + [new])
            i = order.index(new)  # the new stage goes where the sorted order puts it; swaps are dropped
            hops.sort(key=lambda v: self.stage[v])
            origin = paths[m][0]
            before = hops[i - 1] if i else origin
            after = hops[i] if i < len(hops) else origin
            hops.insert(i, self._near(new, before, after, avoid=-1))
            out[m] = (origin, *hops, origin)
        return out

    def toggle_swap(self, paths: Paths, m: int, hop: int) -> dict[int, tuple[int, ...]]:
        path = list(paths[m])
        if hop + 1 >= len(path) - 1:
            return {}
        path[hop], path[hop + 1] = path[hop + 1], path[hop]
        new = tuple(path)
        return {m: new} if self._ok(new) else {}


def improve(
    problem: Problem, stage_of_node: tuple[int, ...], paths: Paths, evals: int, seed: int, mover: Mover | None = None,
    semantics: Semantics = RUNTIME,
) -> tuple[Paths, SimResult]:
    """`evals` moves from `paths`, each judged by simulating the round under `semantics`."""
    rng = random.Random(seed)
    mover = mover or Mover(problem, stage_of_node, rng)
    paths = list(paths)
    mover.pressure = Pressure(problem, stage_of_node)
    mover.track([], paths)
    sim = simulate(problem, paths, semantics)
    best = score(sim)
    L = problem.visits
    for _ in range(evals):
        m = _target(sim, rng)
        r = rng.random()
        if r < MIX[0]:
            change = mover.replica(paths, m, _hot_hop(sim, m, L, rng))
        elif r < MIX[1]:
            change = mover.exchange(paths, m, rng.randrange(len(paths)))
        elif r < MIX[2]:
            change = mover.toggle_swap(paths, m, rng.randrange(1, L))
        elif r < MIX[3]:
            change = mover.reinsert(paths, m)
        else:
            change = mover.exchange_best(paths, m, rng.randrange(len(paths)))
        if not change:
            continue
        old = {k: paths[k] for k in change}
        for k, pth in change.items():
            paths[k] = pth
        trial = simulate(problem, paths, semantics)
        if score(trial) < best:
            sim, best = trial, score(trial)
            mover.track(list(old.values()), list(change.values()))
        else:
            for k, pth in old.items():
                paths[k] = pth
    return paths, sim


def _target(sim: SimResult, rng: random.Random) -> int:
    """A microbatch to change: usually one from the origin that finishes last (its microbatches queue for
    its memory one after another, so any of them delays the end), else a late finisher."""
    ends = sim.mb_end()
    if rng.random() < CRITICAL_ORIGIN:
        last = max(range(len(ends)), key=ends.__getitem__)
        return rng.choice([m for m, nodes in enumerate(sim.nodes) if nodes[0] == sim.nodes[last][0]])
    order = sorted(range(len(ends)), key=lambda m: -ends[m])
    k = min(int(rng.expovariate(1.0) * max(1, len(ends) / 8)), len(ends) - 1)
    return order[k]


def _hot_hop(sim: SimResult, m: int, L: int, rng: random.Random) -> int:
    """A non-origin hop of microbatch m, weighted by how long its steps waited there."""
    waits = [
        1e-3 + (sim.start[m][k] - sim.ready[m][k]) + (sim.start[m][2 * L - k] - sim.ready[m][2 * L - k])
        for k in range(1, L)
    ]
    return 1 + rng.choices(range(L - 1), weights=waits)[0]
