"""The scheduling problem: nodes, links, stages and the skip rules, in plain numbers.

Nodes are addressed by index 0..N-1 everywhere inside `routing/`; `Problem.node_ids` maps an index back to
the caller's id (an int from an instance file, or a peer-id string from the daemon). Plans written to JSON
use those ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

NodeId = int | str


class ProblemError(ValueError):
    """An instance or live snapshot that cannot be planned; the message is one line saying why."""


@dataclass(frozen=True, eq=False)
class Problem:
    node_ids: tuple[NodeId, ...]
    forward_s: np.ndarray  # (N,) seconds of forward compute per microbatch on each node
    memory: np.ndarray  # (N,) microbatches a node can hold (activations kept for backward)
    link_s: np.ndarray  # (N, N) seconds to send one activation (or its gradient); 0 on the diagonal
    stages: int  # S, stage 0 is data + embedding + head + loss
    visits: int  # L, stages each microbatch visits, stage 0 included
    stage_replicas: tuple[int, ...]  # nodes per stage; stage 0 replicas are the data nodes
    microbatches_per_data_node: int
    stage_of_node: tuple[int, ...] | None = None  # fixed assignment, or None to let the planner choose
    max_swaps: int = 2
    max_swap_depth: int = 1
    backward_factor: float = 1.5
    loss_factor: float = 0.25
    name: str = "problem"
    locations: tuple[str, ...] | None = None  # for display only
    _index: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()
        self._index.update({i: k for k, i in enumerate(self.node_ids)})

    @property
    def n(self) -> int:
        return len(self.node_ids)

    @property
    def microbatches(self) -> int:
        return self.stage_replicas[0] * self.microbatches_per_data_node

    def index(self, node_id: NodeId, default: int | None = None) -> int:
        """The index of a node id; `default` (if given) when the id is not in this problem."""
        return self._index[node_id] if default is None else self._index.get(node_id, default)

    def validate(self) -> None:
        n, s, l = len(self.node_ids), self.stages, self.visits
        if len(set(self.node_ids)) != n:
            raise ProblemError("node ids are not unique")
        if len({str(i) for i in self.node_ids}) != n:
            raise ProblemError("node ids collide once written as JSON keys (e.g. 3 and '3')")
        if s < 2:
            raise ProblemError(f"need at least 2 stages, got {s}")
        if not 2 <= l <= s:
            raise ProblemError(f"stages visited per microbatch must be in 2..{s} (the stage count), got {l}")
        if len(self.stage_replicas) != s:
            raise ProblemError(f"stage_replicas has {len(self.stage_replicas)} entries for {s} stages")
        if min(self.stage_replicas) < 1:
            raise ProblemError(f"every stage needs at least one replica, got stage_replicas {list(self.stage_replicas)}")
        if sum(self.stage_replicas) != n:
            raise ProblemError(
                f"stage_replicas {list(self.stage_replicas)} add up to {sum(self.stage_replicas)}, not to the {n} nodes"
            )
        if self.stage_of_node is not None:
            if len(self.stage_of_node) != n or not all(0 <= x < s for x in self.stage_of_node):
                raise ProblemError(f"fixed stage assignment must give each of the {n} nodes a stage in 0..{s - 1}")
            counts = tuple(self.stage_of_node.count(k) for k in range(s))
            if counts != tuple(self.stage_replicas):
                raise ProblemError(f"fixed assignment has replicas {list(counts)}, expected {list(self.stage_replicas)}")
        if self.microbatches_per_data_node < 1:
            raise ProblemError("microbatches per data node must be at least 1")
        if self.max_swaps < 0 or self.max_swap_depth < 0:
            raise ProblemError("swap limits must be non-negative")
        if self.forward_s.shape != (n,) or not np.all(np.isfinite(self.forward_s)) or np.any(self.forward_s <= 0):
            raise ProblemError("every node needs a positive, finite compute time")
        if self.memory.shape != (n,) or np.any(self.memory < 1):
            raise ProblemError("every node needs at least one memory slot")
        if self.link_s.shape != (n, n):
            raise ProblemError(f"link matrix must be {n}x{n}")
        off = ~np.eye(n, dtype=bool)
        bad = np.argwhere(off & ~(np.isfinite(self.link_s) & (self.link_s > 0)))
        if len(bad):
            a, b = bad[0]
            raise ProblemError(f"no usable link between nodes {self.node_ids[a]} and {self.node_ids[b]}")

    # Per-node costs of one microbatch, in seconds.
    def backward_s(self) -> np.ndarray:
        return self.forward_s * self.backward_factor

    def loss_s(self) -> np.ndarray:
        return self.forward_s * self.loss_factor

    @cached_property
    def py_costs(self) -> tuple[list[float], list[float], list[float], list[list[float]]]:
        """forward, backward, loss and link costs as Python lists: the simulator's inner loop reads them."""
        return self.forward_s.tolist(), self.backward_s().tolist(), self.loss_s().tolist(), self.link_s.tolist()

    @cached_property
    def step_cache(self) -> dict:
        """Per path, the simulator's step plan: paths recur across the planner's many simulations."""
        return {}


@dataclass(frozen=True)
class LiveNode:
    """One daemon as the DHT snapshot reports it."""

    id: str
    compute_s: float  # measured forward seconds per microbatch for the stage it (would) host
    memory: int  # microbatch slots it offers
    stage: int | None = None  # the stage it hosts, or None to let the planner choose


@dataclass(frozen=True)
class LiveLink:
    """A measured link estimate; links are treated as symmetric."""

    a: str
    b: str
    rtt_s: float
    bandwidth_Bps: float


def from_live(
    nodes: list[LiveNode],
    links: list[LiveLink],
    *,
    stages: int,
    visits: int,
    activation_bytes: int,
    microbatches_per_data_node: int,
    stage_replicas: list[int] | None = None,
    max_swaps: int = 2,
    max_swap_depth: int = 1,
    fixed_overhead_s: float = 0.0,
    missing_link_s: float | None = None,
    name: str = "live",
) -> Problem:
    """Build a Problem from the daemon's live measurements.

    Either every node reports its stage (fixed assignment, replica counts follow) or none does and
    `stage_replicas` says how many nodes each stage gets. A link costs rtt/2 + activation_bytes/bandwidth +
    fixed_overhead_s; a pair with no estimate costs `missing_link_s`, or is refused when that is None.
    """
    ids = [nd.id for nd in nodes]
    idx = {k: i for i, k in enumerate(ids)}
    n = len(ids)
    link = np.full((n, n), np.inf)
    np.fill_diagonal(link, 0.0)
    for lk in links:
        if lk.a not in idx or lk.b not in idx or lk.a == lk.b:
            continue  # estimates to peers outside the snapshot are irrelevant
        if lk.rtt_s < 0 or lk.bandwidth_Bps <= 0:
            raise ProblemError(f"bad link estimate {lk.a}-{lk.b}: rtt {lk.rtt_s}, bandwidth {lk.bandwidth_Bps}")
        t = lk.rtt_s / 2 + activation_bytes / lk.bandwidth_Bps + fixed_overhead_s
        i, j = idx[lk.a], idx[lk.b]
        link[i, j] = link[j, i] = min(link[i, j], t)
    if missing_link_s is not None:
        link[np.isinf(link)] = missing_link_s
    given = [nd.stage for nd in nodes]
    if all(g is not None for g in given):
        fixed = tuple(int(g) for g in given)
        replicas = tuple(fixed.count(k) for k in range(stages))
        if stage_replicas is not None and tuple(stage_replicas) != replicas:
            raise ProblemError(f"nodes host stages {list(replicas)} but stage_replicas says {list(stage_replicas)}")
    elif any(g is not None for g in given):
        raise ProblemError("either every node reports its stage or none does")
    else:
        if stage_replicas is None:
            raise ProblemError("stage_replicas is required when nodes do not report their stage")
        fixed, replicas = None, tuple(stage_replicas)
    return Problem(
        node_ids=tuple(ids),
        forward_s=np.array([nd.compute_s for nd in nodes], dtype=float),
        memory=np.array([nd.memory for nd in nodes], dtype=int),
        link_s=link,
        stages=stages,
        visits=visits,
        stage_replicas=replicas,
        microbatches_per_data_node=microbatches_per_data_node,
        stage_of_node=fixed,
        max_swaps=max_swaps,
        max_swap_depth=max_swap_depth,
        name=name,
    )


def link_time(latency_s: float, bandwidth_Bps: float, nbytes: float, overhead_s: float) -> float:
    if bandwidth_Bps <= 0 or not math.isfinite(bandwidth_Bps):
        return math.inf
    return latency_s + nbytes / bandwidth_Bps + overhead_s
