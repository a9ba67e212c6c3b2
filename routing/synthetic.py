"""Seeded synthetic swarms for scaling runs and tests, and the swarm changes (nodes leaving or joining)."""

from __future__ import annotations

import numpy as np

from routing.plan import Plan
from routing.problem import Problem

ACTIVATION_BYTES = 4 * 1024 * 1024 * 8  # fp32, d_model 1024, context 1024, 8 sequences: as gcp12-20nodes
OVERHEAD_S = 0.35
FORWARD_S = 1.76  # 0.055 s per sample per layer x 4 layers x 8 samples


def generate(
    n: int, seed: int = 0, *, stages: int = 6, visits: int = 4, memory: int = 3, microbatches_per_data_node: int = 6
) -> Problem:
    """n nodes in regions of about 7 across a 20 000 km square; a quarter of the nodes are data nodes.

    Latency is 1 ms per 100 km plus 1 ms; bandwidth falls from ~0.3 GiB/s nearby to ~0.01 GiB/s far away;
    2 GiB/s inside a region. Node speeds vary by +-25 %.
    """
    rng = np.random.default_rng(seed)
    regions = max(3, n // 7)
    centre = rng.uniform(0, 20_000, size=(regions, 2))
    region = np.arange(n) % regions
    pos = centre[region] + rng.normal(0, 300, size=(n, 2))
    km = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    latency = 0.001 + km / 100_000
    gib_s = np.where(region[:, None] == region[None], 2.0, 0.3 * np.exp(-km / 2000) + 0.01)
    link = latency + ACTIVATION_BYTES / (gib_s * 1024**3) + OVERHEAD_S
    np.fill_diagonal(link, 0.0)
    data = max(1, n // 4)
    rest = n - data
    replicas = [data] + [rest // (stages - 1) + (s < rest % (stages - 1)) for s in range(stages - 1)]
    return Problem(
        node_ids=tuple(range(n)),
        forward_s=FORWARD_S * rng.uniform(0.8, 1.25, size=n),
        memory=np.full(n, memory),
        link_s=link,
        stages=stages,
        visits=visits,
        stage_replicas=tuple(replicas),
        microbatches_per_data_node=microbatches_per_data_node,
        name=f"synthetic-{n}-seed{seed}",
    )


def drop_nodes(problem: Problem, plan: Plan, gone: list, stage_replicas: tuple[int, ...] | None = None) -> Problem:
    """The swarm after nodes `gone` (ids) left. Replica counts follow `plan`'s assignment of the others
    unless `stage_replicas` asks for new ones (e.g. to refill a stage that lost its last replica)."""
    keep = [v for v, i in enumerate(problem.node_ids) if i not in set(gone)]
    stage = [plan.stage_of_node[v] for v in keep]
    fixed = tuple(stage) if problem.stage_of_node is not None else None
    replicas = stage_replicas or tuple(stage.count(s) for s in range(problem.stages))
    return _subset(problem, keep, replicas, fixed)


def add_node(problem: Problem, plan: Plan, node_id, forward_s: float, memory: int, link_row: np.ndarray, stage: int) -> Problem:
    """The swarm after one node joins to serve `stage`; link_row holds its link times to the others."""
    n = problem.n
    link = np.zeros((n + 1, n + 1))
    link[:n, :n] = problem.link_s
    link[n, :n] = link[:n, n] = link_row
    replicas = [plan.stage_of_node.count(s) + (s == stage) for s in range(problem.stages)]
    return Problem(
        node_ids=problem.node_ids + (node_id,),
        forward_s=np.append(problem.forward_s, forward_s),
        memory=np.append(problem.memory, memory),
        link_s=link,
        stages=problem.stages,
        visits=problem.visits,
        stage_replicas=tuple(replicas),
        microbatches_per_data_node=problem.microbatches_per_data_node,
        stage_of_node=None if problem.stage_of_node is None else problem.stage_of_node + (stage,),
        max_swaps=problem.max_swaps,
        max_swap_depth=problem.max_swap_depth,
        name=problem.name + "+1",
        locations=problem.locations + ("joined",) if problem.locations else None,
    )


def _subset(problem: Problem, keep: list[int], replicas: tuple[int, ...], fixed: tuple[int, ...] | None) -> Problem:
    return Problem(
        node_ids=tuple(problem.node_ids[v] for v in keep),
        forward_s=problem.forward_s[keep],
        memory=problem.memory[keep],
        link_s=problem.link_s[np.ix_(keep, keep)],
        stages=problem.stages,
        visits=problem.visits,
        stage_replicas=replicas,
        microbatches_per_data_node=problem.microbatches_per_data_node,
        stage_of_node=fixed,
        max_swaps=problem.max_swaps,
        max_swap_depth=problem.max_swap_depth,
        name=problem.name + f"-{problem.n - len(keep)}",
        locations=tuple(problem.locations[v] for v in keep) if problem.locations else None,
    )
