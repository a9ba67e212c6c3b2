"""Stage assignment when the problem leaves it open.

Idea: a microbatch's lifetime is mostly links, so a data node wants every stage close by. Split the nodes
into g = min(replicas) groups of nearby nodes, give each group one replica of every stage (the spare
replicas go to the larger groups), and make each group's most central nodes its data nodes. The path
planner may still route across groups; this only makes short chains possible everywhere.
"""

from __future__ import annotations

import numpy as np

from routing.problem import Problem


HUBS = 64


def _distance(problem: Problem) -> np.ndarray:
    """Link times, or two hops through a well-spread hub where that is quicker: one near-dead link should not
    tear a region apart, since paths can route around it."""
    link = problem.link_s
    hubs = _spread(link, min(HUBS, problem.n))
    dist = link.copy()
    for k in hubs:
        np.minimum(dist, link[:, k, None] + link[None, k, :], out=dist)
    return dist


def _spread(dist: np.ndarray, k: int) -> list[int]:
    """k nodes chosen farthest-first, starting from the most remote one."""
    seeds = [int(np.argmax(dist.sum(1)))]
    nearest = dist[seeds[0]].copy()
    while len(seeds) < k:
        seeds.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, dist[seeds[-1]])
    return seeds


def partition(dist: np.ndarray, sizes: list[int]) -> list[list[int]]:
    """Nodes into groups of the given sizes with small total within-group distance (seed, fill, then swap)."""
    n, g = len(dist), len(sizes)
    seeds = _spread(dist, g)
    group = np.full(n, -1)
    cap = list(sizes)
    for flat in np.argsort(dist[:, seeds], axis=None, kind="stable"):
        v, j = divmod(int(flat), g)
        if group[v] < 0 and cap[j] > 0:
            group[v] = j
            cap[j] -= 1
    # Pairwise swaps between groups while one lowers the total; w[v, j] = distance from v to group j.
    w = np.stack([dist[:, group == j].sum(1) for j in range(g)], axis=1)
    rows = np.arange(n)
    for _ in range(10):
        improved = False
        for a in range(n):
            ga = group[a]
            delta = w[a, group] - 2 * dist[a] + w[:, ga] - w[a, ga] - w[rows, group]
            delta[group == ga] = np.inf
            b = int(np.argmin(delta))
            if delta[b] < -1e-9:
                gb = group[b]
                w[:, ga] += dist[:, b] - dist[:, a]
                w[:, gb] += dist[:, a] - dist[:, b]
                group[a], group[b] = gb, ga
                improved = True
        if not improved:
            break
    return [sorted(np.flatnonzero(group == j).tolist()) for j in range(g)]


def split_replicas(replicas: tuple[int, ...], sizes: list[int]) -> list[list[int]]:
    """Per group, how many replicas of each stage it hosts: one of each, spares to groups with room."""
    g, stages = len(sizes), len(replicas)
    counts = [[1] * stages for _ in range(g)]
    room = [size - stages for size in sizes]
    spare = [r - g for r in replicas]
    for s in sorted(range(stages), key=lambda s: -spare[s]):
        for _ in range(spare[s]):
            j = max(range(g), key=lambda j: (room[j], -counts[j][s]))
            counts[j][s] += 1
            room[j] -= 1
    return counts


def assign_stages(problem: Problem) -> tuple[int, ...]:
    if problem.stage_of_node is not None:
        return tuple(problem.stage_of_node)
    dist = _distance(problem)
    g = min(problem.stage_replicas)
    sizes = [problem.n // g + (j < problem.n % g) for j in range(g)]
    stage = [0] * problem.n
    for members, counts in zip(partition(dist, sizes), split_replicas(problem.stage_replicas, sizes)):
        central = sorted(members, key=lambda v: (dist[v, members].sum(), v))
        roles = [s for s, c in enumerate(counts) for _ in range(c)]
        for v, s in zip(central, roles):
            stage[v] = s
    return tuple(stage)
