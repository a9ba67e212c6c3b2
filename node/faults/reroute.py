"""Re-routing a round's microbatches around dead peers, and the round's expected time.

The origin of a microbatch whose hop failed asks `PathRepair.path_for` for a new path. While every stage
the round uses keeps a live replica, the answer comes from `routing.repair`: the round's plan is
repaired for the live nodes (the dead peer removed), which moves every broken path to other replicas
and keeps the round's stage visits balanced; one repair per (round, set of dead peers) serves every
microbatch that lost a hop to them. When a stage has no live replica left, a skip plan (visits < stages)
replaces that stage on the broken path with the live stage fewest microbatches visit, or drops it; a
full pipeline cannot finish the microbatch.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

from protocol.envelope import HopSpec
from protocol.records import NodeRecord, PlannedMicrobatch, RoundPlan
from routing import LiveNode, Plan, Problem, ProblemError, from_live, repair

log = logging.getLogger(__name__)

DEFAULT_COMPUTE_S = 0.01  # a node whose record is gone: any positive number; it only matters for the dead
UNMEASURED_LINK_S = 0.005


def expected_round_seconds(plan: RoundPlan, members: dict[str, NodeRecord]) -> float:
    """The busiest node's compute for the round (forward + backward of every visit it serves): a lower bound
    on the round's length that per-hop deadlines are multiples of."""
    busy: Counter[str] = Counter()
    for mb in plan.microbatches:
        for hop in mb.path[:-1]:
            record = members.get(hop.peer_id)
            compute = record.compute_s.get(hop.stage, DEFAULT_COMPUTE_S) if record else DEFAULT_COMPUTE_S
            busy[hop.peer_id] += compute * (1 + Problem.backward_factor)  # routing's backward cost
    return max(busy.values(), default=0.0)


class PathRepair:
    def __init__(self, activation_bytes: int):
        self.activation_bytes = activation_bytes
        self._repaired: dict[tuple[int, frozenset[str]], dict[int, tuple[HopSpec, ...]] | None] = {}
        self._lock = threading.Lock()

    def path_for(self, plan: RoundPlan, microbatch: int, avoid: frozenset[str],
                 members: dict[str, NodeRecord]) -> tuple[HopSpec, ...] | None:
        """A path for `microbatch` that avoids every peer in `avoid`, or None when none exists."""
        mb = next(m for m in plan.microbatches if m.id == microbatch)
        if mb.origin in avoid:
            return None
        key = (plan.round, avoid)
        with self._lock:
            if key not in self._repaired:
                self._repaired = {k: v for k, v in self._repaired.items() if k[0] >= plan.round}
                self._repaired[key] = self._repair(plan, avoid, members)
            repaired = self._repaired[key]
        if repaired is not None and microbatch in repaired:
            return repaired[microbatch]
        return self._substitute(plan, mb, avoid)

    # ---- every stage still has a replica: routing's repair -----------------------------------------------------
    def _repair(self, plan: RoundPlan, avoid: frozenset[str],
                members: dict[str, NodeRecord]) -> dict[int, tuple[HopSpec, ...]] | None:
        hops: dict[str, HopSpec] = {}
        for mb in plan.microbatches:
            for hop in mb.path:
                hops.setdefault(f"{hop.peer_id}/{hop.stage}", hop)
        stages = sorted({h.stage for h in hops.values()})  # the stages this round uses, relabelled 0..k-1
        label = {s: i for i, s in enumerate(stages)}
        live = {i: h for i, h in hops.items() if h.peer_id not in avoid}
        if {h.stage for h in live.values()} != set(stages):
            return None  # a stage is gone entirely: repair cannot plan without it
        visits = len(plan.microbatches[0].path) - 1
        if any(len(mb.path) - 1 != visits for mb in plan.microbatches):
            return None  # paths of mixed lengths (already re-routed by dropping a stage)
        origins = Counter(mb.origin for mb in plan.microbatches)
        per_origin = max(origins.values())
        if set(origins.values()) != {per_origin}:
            return None

        def problem(nodes: dict[str, HopSpec]):
            live_nodes = []
            for node_id, h in nodes.items():
                record = members.get(h.peer_id)
                compute = record.compute_s.get(h.stage, DEFAULT_COMPUTE_S) if record else DEFAULT_COMPUTE_S
                live_nodes.append(LiveNode(node_id, compute_s=max(compute, 1e-4),
                                           memory=record.memory_slots if record else 1, stage=label[h.stage]))
            return from_live(live_nodes, [], stages=len(stages), visits=visits,
                             activation_bytes=self.activation_bytes, microbatches_per_data_node=per_origin,
                             missing_link_s=UNMEASURED_LINK_S,
                             max_swaps=0 if visits == len(stages) else 2)  # full pipelines keep stage order

        try:
            old = problem(hops)
            new = problem(live)
            paths = tuple(tuple(old.index(f"{h.peer_id}/{h.stage}") for h in mb.path) for mb in plan.microbatches)
            old_plan = Plan(old.stage_of_node, paths, tuple(mb.id for mb in plan.microbatches))
            result = repair(old, old_plan, new, seed=plan.round)
        except (ProblemError, ValueError, IndexError) as e:
            log.info("round %d: routing could not repair the plan (%s); substituting replicas", plan.round, e)
            return None
        return {mb_id: tuple(live[new.node_ids[v]] for v in path) for mb_id, path in zip(result.mb_ids, result.paths)}

    # ---- a stage has no live replica (or repair failed): substitute hop by hop ---------------------------------
    def _substitute(self, plan: RoundPlan, mb: PlannedMicrobatch, avoid: frozenset[str]) -> tuple[HopSpec, ...] | None:
        replicas: dict[int, dict[str, HopSpec]] = {}
        load: Counter[str] = Counter()
        visits: Counter[int] = Counter()
        for m in plan.microbatches:
            for hop in m.path[1:-1]:
                visits[hop.stage] += 1
                if hop.peer_id not in avoid:
                    replicas.setdefault(hop.stage, {})[hop.peer_id] = hop
                    load[hop.peer_id] += 1
        full = len(mb.path) - 1 == len({h.stage for m in plan.microbatches for h in m.path})
        used = {h.stage for h in mb.path}
        path = [mb.path[0]]
        for hop in mb.path[1:-1]:
            if hop.peer_id not in avoid:
                path.append(hop)
                continue
            stage = hop.stage
            if stage not in replicas:
                if full:
                    return None  # a full pipeline cannot skip a stage
                spare = [s for s in replicas if s not in used]
                if not spare:
                    continue  # nothing left to visit instead: this microbatch skips one more stage
                stage = min(spare, key=lambda s: (visits[s], s))
                used.add(stage)
            chosen = min(replicas[stage].values(), key=lambda h: (load[h.peer_id], h.peer_id))
            load[chosen.peer_id] += 1
            path.append(chosen)
        path.append(mb.path[-1])
        return tuple(path)
