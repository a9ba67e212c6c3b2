"""Greedy path construction: microbatch by microbatch, the cheapest valid path given the load so far.

A path's cost is its links (each paid twice: activation forward, gradient back) plus, per visited node, the
marginal cost of its compute and memory use under a convex penalty (`Pressure`), so busy nodes look
expensive. For one microbatch, every allowed stage subset is scored at once: a shortest path through a
layered graph (one layer per visited stage, a node per candidate replica), vectorised over the subsets.

Visit counts per stage are fixed up front (`stage_quotas`); a stage whose remaining quota equals the number
of microbatches left must be visited now, which keeps the quotas reachable to the end.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from routing.problem import Problem

CANDIDATES = 16  # replicas per stage considered for a hop: the nearest ones to the microbatch's origin
LOAD_WEIGHT = 2.0
SLOT_WEIGHT = 2.0
POWER = 2


def stage_quotas(problem: Problem, stage_of_node: tuple[int, ...], microbatches: int) -> list[int]:
    """Visits each stage gets: equal shares, the remainder to the stages with the most replicas."""
    total = microbatches * (problem.visits - 1)
    base, extra = divmod(total, problem.stages - 1)
    by_room = sorted(range(1, problem.stages), key=lambda s: (-stage_of_node.count(s), s))
    quota = [0] + [base] * (problem.stages - 1)
    for s in by_room[:extra]:
        quota[s] += 1
    return quota


def all_orders(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Every stage subset in increasing order (stage 0 left out) as rows, and which stages each row visits.

    Swaps are left to the local search: two microbatches that swap stages in opposite directions can wait on
    each other's memory forever, and only the simulator can tell (it rejects such a plan)."""
    rows = list(combinations(range(1, problem.stages), problem.visits - 1))
    orders = np.array(rows, dtype=int).reshape(len(rows), problem.visits - 1)
    member = np.zeros((len(rows), problem.stages), dtype=bool)
    np.put_along_axis(member, orders, True, axis=1)
    return orders, member


class PathChooser:
    """Scores all stage orders x replicas for a microbatch from a given origin (see the module doc)."""

    def __init__(self, problem: Problem, stage_of_node: tuple[int, ...], orders: np.ndarray, member: np.ndarray):
        n = problem.n
        self.orders, self.member = orders, member
        self.work = problem.forward_s + problem.backward_s()
        # Index n is padding: a stage with fewer replicas than CANDIDATES is filled with it; it costs inf.
        self.link2 = np.full((n + 1, n + 1), np.inf)
        self.link2[:n, :n] = 2 * problem.link_s
        stage = np.array(stage_of_node)
        self.replicas = [np.flatnonzero(stage == s) for s in range(problem.stages)]
        self.k = min(CANDIDATES, max(len(r) for r in self.replicas[1:]))
        self._cand: dict[int, np.ndarray] = {}

    def candidates(self, origin: int) -> np.ndarray:
        """(S, k) replicas per stage nearest to the origin, padded with n."""
        if origin not in self._cand:
            n = len(self.work)
            cand = np.full((len(self.replicas), self.k), n)
            for s, reps in enumerate(self.replicas):
                near = reps[np.argsort(self.link2[origin, reps], kind="stable")[: self.k]]
                cand[s, : len(near)] = near
            self._cand[origin] = cand
        return self._cand[origin]

    def best(self, origin: int, node_cost: np.ndarray, allowed: np.ndarray) -> tuple[float, tuple[int, ...]]:
        """Cheapest (cost, hop nodes) over the allowed order rows; node_cost[i] is the cost of each node as
        hop i + 1, with n + 1 entries (pad = inf)."""
        rows = self.orders[allowed]
        nodes = self.candidates(origin)[rows]  # (orders, L-1, k)
        cost = self.link2[origin][nodes[:, 0]] + node_cost[0][nodes[:, 0]]
        back = []
        for i in range(1, rows.shape[1]):
            step = cost[:, :, None] + self.link2[nodes[:, i - 1, :, None], nodes[:, i, None, :]]
            back.append(step.argmin(1))
            cost = step.min(1) + node_cost[i][nodes[:, i]]
        cost = cost + self.link2[nodes[:, -1], origin]
        o, j = divmod(int(np.argmin(cost)), cost.shape[1])
        total = float(cost[o, j])
        hops = [int(nodes[o, -1, j])]
        for i in range(len(back) - 1, -1, -1):
            j = int(back[i][o, j])
            hops.append(int(nodes[o, i, j]))
        return total, tuple(hops[::-1])


class Pressure:
    """Per-node compute load and memory use (slot-seconds over slots) of a set of paths, and what adding one
    more hop would cost: target * (used / target) ** POWER / POWER grows slowly while a node is far below
    the target and steeply near it, so paths spread before they queue."""

    def __init__(self, problem: Problem, stage_of_node: tuple[int, ...]):
        n, L = problem.n, problem.visits
        self.work = np.append(problem.forward_s + problem.backward_s(), np.inf)  # index n is padding
        self.loss = np.append(problem.loss_s(), 0.0)
        self.mem = np.append(problem.memory, 1)
        # Hop i holds a slot from its forward start to its backward end: its share of the path's compute,
        # plus links at a typical short-link price.
        short = float(np.quantile(problem.link_s[~np.eye(n, dtype=bool)], 0.2)) if n > 1 else 0.0
        mean_work = float(self.work[:n].mean())
        self.hold = [(L - i) * mean_work + float(self.loss[:n].mean()) + 2 * (L - i) * short for i in range(L)]
        self.load = np.zeros(n + 1)
        self.slots = np.zeros(n + 1)
        data = [v for v, s in enumerate(stage_of_node) if s == 0]
        stage_nodes = [v for v, s in enumerate(stage_of_node) if s]
        per = problem.microbatches_per_data_node
        visits = len(data) * per * (L - 1)
        self.target = max(
            per * self.hold[0] / float(self.mem[data].min()),
            per * float((self.work[data] + self.loss[data]).max()),
            visits * float(self.work[stage_nodes].mean()) / len(stage_nodes),
        )

    def add(self, path: tuple[int, ...], sign: int = 1) -> None:
        origin = path[0]
        self.load[origin] += sign * (self.work[origin] + self.loss[origin])
        self.slots[origin] += sign * self.hold[0] / self.mem[origin]
        for i, v in enumerate(path[1:-1], start=1):
            self.load[v] += sign * self.work[v]
            self.slots[v] += sign * self.hold[i] / self.mem[v]

    def costs(self) -> list[np.ndarray]:
        """Per hop position (1..L-1), the marginal cost of putting that hop on each node."""
        load = LOAD_WEIGHT * self._marginal(self.load, self.work)
        return [load + SLOT_WEIGHT * self._marginal(self.slots, h / self.mem) for h in self.hold[1:]]

    def _marginal(self, used: np.ndarray, add: np.ndarray) -> np.ndarray:
        t = self.target
        return t * (((used + add) / t) ** POWER - (used / t) ** POWER) / POWER


def construct(problem: Problem, stage_of_node: tuple[int, ...]) -> tuple[list[tuple[int, ...]], list[int]]:
    """Paths (origin first and last) and microbatch ids; ids run origin by origin in node order."""
    data = [v for v, s in enumerate(stage_of_node) if s == 0]
    per = problem.microbatches_per_data_node
    total = len(data) * per
    quota = stage_quotas(problem, stage_of_node, total)
    chooser = PathChooser(problem, stage_of_node, *all_orders(problem))
    pressure = Pressure(problem, stage_of_node)
    paths: dict[int, tuple[int, ...]] = {}
    for k in range(total):
        left = total - k
        origin = data[k % len(data)]
        q = np.array(quota)
        allowed = ~(chooser.member & (q == 0)).any(1) & chooser.member[:, q == left].all(1)
        _, hops = chooser.best(origin, pressure.costs(), allowed)
        path = (origin, *hops, origin)
        pressure.add(path)
        for v in hops:
            quota[stage_of_node[v]] -= 1
        paths[data.index(origin) * per + k // len(data)] = path
    ids = sorted(paths)
    return [paths[i] for i in ids], ids
