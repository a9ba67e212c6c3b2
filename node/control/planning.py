"""Turn a membership snapshot and the measured links into a round plan, always through `routing/`.

Full pipelines (`--visits` equal to `--num-stages`) and SkipPipe paths are planned alike: `live_problem`
builds routing's Problem from the nodes' records (compute seconds, memory slots, hosted stages) and the
links they measured, `routing.plan` plans it, and `to_wire`/`from_wire` are the one conversion between
routing's Plan and the RoundPlan the DHT carries. `predict_sync` prices the plan's replica sync
(`routing.sync_cost`) over the same links, for the whole round the plan predicts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from protocol.codecs import wire_bytes
from protocol.envelope import HopSpec
from protocol.records import LinkEstimate, NodeRecord, PlannedMicrobatch, RoundPlan
from routing import LiveLink, LiveNode, Plan, Problem, ProblemError, cover_replicas, from_live
from routing import plan as plan_paths
from routing.sync_cost import SyncSetting, sync_seconds

# The estimate a pair gets until it is measured, or when its estimate is absurd: loopback-like, so an
# unmeasured pair is neither preferred nor avoided much. `swarm-node status --links` shows where it applies.
DEFAULT_LINK = LinkEstimate(rtt_s=0.002, bandwidth_Bps=1e9)
SAME_HOST_LINK_S = 1e-6  # two stages of one daemon: the hand-over is a function call


@dataclass(frozen=True)
class LiveProblem:
    """A Problem built from the swarm, and how its node ids map back to hops."""

    problem: Problem
    hops: dict[str, HopSpec]  # routing node id ("<peer id>/<stage>") -> the hop it stands for
    defaulted_links: int  # peer pairs priced with DEFAULT_LINK (unmeasured or absurd)


def node_id(peer_id: str, stage: int) -> str:
    return f"{peer_id}/{stage}"  # a daemon hosting two stages plans as two nodes


def membership_digest(members: dict[str, NodeRecord]) -> str:
    """Of the members a plan may use: one that says it cannot receive hops changes nothing."""
    text = ";".join(f"{p}:{','.join(map(str, r.stages))}@{r.endpoint}" for p, r in sorted(members.items())
                    if r.reach.receives_hops)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def serving_replicas(members: dict[str, NodeRecord], num_stages: int) -> dict[int, list[NodeRecord]]:
    replicas: dict[int, list[NodeRecord]] = {s: [] for s in range(num_stages)}
    for peer in sorted(members):
        record = members[peer]
        if record.plannable:  # serving, and not saying it cannot receive hops (unreachable)
            for stage in record.stages:
                if stage < num_stages:
                    replicas[stage].append(record)
    return replicas


def choose_planner(members: dict[str, NodeRecord]) -> str | None:
    """The round's planner: the plannable data node with the lowest peer id. Every node computes the same."""
    data_nodes = sorted(p for p, r in members.items() if r.plannable and 0 in r.stages)
    return data_nodes[0] if data_nodes else None


def live_problem(members: dict[str, NodeRecord], links: dict[tuple[str, str], LinkEstimate], *, num_stages: int,
                 visits: int, microbatches_per_origin: int, activation_bytes: int) -> LiveProblem | None:
    """routing's Problem for this swarm; None while some stage has no serving replica."""
    replicas = serving_replicas(members, num_stages)
    if any(not replicas[s] for s in range(num_stages)):
        return None
    nodes, hops = [], {}
    for stage, records in replicas.items():
        for record in records:
            compute = record.compute_s.get(stage) or max(record.compute_s.values(), default=0.01)
            key = node_id(record.peer_id, stage)
            nodes.append(LiveNode(key, compute_s=max(compute, 1e-6), memory=record.memory_slots, stage=stage))
            hops[key] = HopSpec(stage, record.peer_id, record.endpoint)
    live_links, defaulted = [], 0
    peers = sorted({h.peer_id for h in hops.values()})
    for i, a in enumerate(peers):
        for b in peers[i + 1:]:
            estimate = _pair_estimate(links, a, b)
            if estimate is None:
                defaulted += 1
                estimate = DEFAULT_LINK
            for x in (k for k, h in hops.items() if h.peer_id == a):
                for y in (k for k, h in hops.items() if h.peer_id == b):
                    live_links.append(LiveLink(x, y, estimate.rtt_s, estimate.bandwidth_Bps))
    full = visits >= num_stages
    problem = from_live(nodes, live_links, stages=num_stages, visits=min(visits, num_stages),
                        activation_bytes=activation_bytes, microbatches_per_data_node=microbatches_per_origin,
                        max_swaps=0 if full else 2, missing_link_s=SAME_HOST_LINK_S)
    return LiveProblem(problem, hops, defaulted)


def _pair_estimate(links: dict[tuple[str, str], LinkEstimate], a: str, b: str) -> LinkEstimate | None:
    """The pair's estimate, both directions averaged (routing treats links as symmetric); None when no usable
    RTT is known. A usable RTT without a usable bandwidth (no large hop yet) takes the default bandwidth."""
    found = [_filled(e) for e in (links.get((a, b)), links.get((b, a))) if e is not None]
    found = [e for e in found if e is not None]
    if not found:
        return None
    return LinkEstimate(sum(e.rtt_s for e in found) / len(found),
                        len(found) / sum(1 / e.bandwidth_Bps for e in found))


def _filled(e: LinkEstimate) -> LinkEstimate | None:
    if e.usable():
        return e
    if LinkEstimate(e.rtt_s, DEFAULT_LINK.bandwidth_Bps).usable():
        return LinkEstimate(e.rtt_s, DEFAULT_LINK.bandwidth_Bps)
    return None


def plan_round(members: dict[str, NodeRecord], links: dict[tuple[str, str], LinkEstimate], *, round_: int,
               num_stages: int, visits: int, microbatches_per_origin: int, activation_bytes: int, planner: str,
               deadline: float = 0.0) -> tuple[RoundPlan, LiveProblem] | None:
    """The round's plan from routing/ (full pipelines too); None while some stage has no serving replica.

    A one-stage swarm (data parallelism only) has nothing to route: each microbatch stays at its origin,
    and no LiveProblem comes back."""
    if num_stages == 1:
        return _origin_only_plan(members, round_=round_, microbatches_per_origin=microbatches_per_origin,
                                 planner=planner, deadline=deadline), None
    live = live_problem(members, links, num_stages=num_stages, visits=visits,
                        microbatches_per_origin=microbatches_per_origin, activation_bytes=activation_bytes)
    if live is None:
        return None
    try:
        # Every replica in the round: one left out could take no re-routed microbatch, and would copy state
        # after the round instead of training.
        result = cover_replicas(live.problem, plan_paths(live.problem, seed=round_))
    except ProblemError as e:
        raise ValueError(f"cannot plan round {round_}: {e}") from e
    return to_wire(live, result, round_=round_, planner=planner, digest=membership_digest(members),
                   deadline=deadline), live


def _origin_only_plan(members: dict[str, NodeRecord], *, round_: int, microbatches_per_origin: int, planner: str,
                      deadline: float) -> RoundPlan | None:
    origins = serving_replicas(members, 1)[0]
    if not origins:
        return None
    planned = []
    for record in origins:
        hop = HopSpec(0, record.peer_id, record.endpoint)
        for _ in range(microbatches_per_origin):
            planned.append(PlannedMicrobatch(len(planned), (hop, hop)))
    return RoundPlan(round=round_, planner=planner, membership_digest=membership_digest(members),
                     microbatches=tuple(planned), deadline=deadline)


def to_wire(live: LiveProblem, plan: Plan, *, round_: int, planner: str, digest: str,
            deadline: float = 0.0) -> RoundPlan:
    """routing's Plan as the RoundPlan published in the DHT (hops carry peer ids and endpoints)."""
    ids = live.problem.node_ids
    planned = tuple(PlannedMicrobatch(mb, tuple(live.hops[ids[v]] for v in path))
                    for mb, path in sorted(zip(plan.mb_ids, plan.paths)))
    return RoundPlan(round=round_, planner=planner, membership_digest=digest, microbatches=planned,
                     deadline=deadline, predicted_s=plan.predicted_iteration_s)


def from_wire(problem: Problem, wire: RoundPlan) -> Plan:
    """A published RoundPlan as routing's Plan over `problem`, so routing's checkers and simulator can judge it."""
    paths = tuple(tuple(problem.index(node_id(h.peer_id, h.stage)) for h in mb.path) for mb in wire.microbatches)
    stage_of_node = tuple(int(str(i).rsplit("/", 1)[1]) for i in problem.node_ids)
    return Plan(stage_of_node=stage_of_node, paths=paths, mb_ids=tuple(mb.id for mb in wire.microbatches),
                predicted_iteration_s=wire.predicted_s)


def wire_ratio(codec: str) -> float:
    """Wire bytes per float32 byte of a large tensor under `codec`: what outer's pseudo-gradients cost."""
    numel = 1 << 20  # large enough that per-block scales are their steady share
    return wire_bytes(codec, (numel,), 4) / (4 * numel)


def predict_sync(plan: RoundPlan, links: dict[tuple[str, str], LinkEstimate], gradient_bytes: Sequence[int],
                 codec: str) -> float:
    """Seconds the plan's sync adds to a round (`routing.sync_cost`): each stage's replicas in the plan, with
    `gradient_bytes[s]` float32 bytes, over the measured links (one-way latency rtt/2; DEFAULT_LINK where
    unmeasured, as the paths are priced); `codec` is outer's pseudo-gradient codec (this node's --sync-codec)."""
    peers = sorted(plan.participants())
    index = {p: i for i, p in enumerate(peers)}
    n = len(peers)
    latency, bandwidth = np.zeros((n, n)), np.full((n, n), np.inf)
    for i, a in enumerate(peers):
        for j in range(i + 1, n):
            estimate = _pair_estimate(links, a, peers[j]) or DEFAULT_LINK
            latency[i, j] = latency[j, i] = estimate.rtt_s / 2
            bandwidth[i, j] = bandwidth[j, i] = estimate.bandwidth_Bps
    groups = [[index[p] for p in sorted(plan.replicas(s))] for s in range(len(gradient_bytes))]
    setting = SyncSetting(plan.sync, plan.sync_every, wire_ratio(codec))
    return sync_seconds(groups, gradient_bytes, latency, bandwidth, setting, plan.predicted_s)


def missing_stages(members: dict[str, NodeRecord], num_stages: int) -> list[int]:
    """Stages no plannable member hosts (an unreachable replica cannot take the stage's hops)."""
    hosted = {s for r in members.values() if r.plannable for s in r.stages}
    return [s for s in range(num_stages) if s not in hosted]


def without_banned(members: dict[str, NodeRecord], banned: frozenset[str], num_stages: int
                   ) -> dict[str, NodeRecord]:
    """`members` less the banned ones, except a stage's last plannable replicas: without them no path has the
    stage, and a ban (one receiver's accusation) would stop a full pipeline or cut a stage from every path."""
    kept = {p: r for p, r in members.items() if p not in banned}
    lost = set(missing_stages(kept, num_stages)) - set(missing_stages(members, num_stages))
    return {p: r for p, r in members.items() if p in kept or lost & set(r.stages)}


def plan_around_missing(plan_for: Callable[[dict[str, NodeRecord], int, int], tuple[RoundPlan, object] | None],
                        members: dict[str, NodeRecord], num_stages: int, visits: int,
                        missing: list[int]) -> tuple[RoundPlan, object] | None:
    """A skip plan over the stages that are left: `plan_for(members, num_stages, visits)` plans with the stages
    relabelled 0..k-1, and the paths are relabelled back, so microbatches skip the missing ones. None when
    fewer than two stages are left."""
    present = [s for s in range(num_stages) if s not in missing]
    if 0 in missing or len(present) < 2:
        return None
    label = {s: i for i, s in enumerate(present)}
    relabelled = {p: replace(r, stages=tuple(label[s] for s in r.stages if s in label),
                             compute_s={label[s]: c for s, c in r.compute_s.items() if s in label})
                  for p, r in members.items() if any(s in label for s in r.stages)}
    made = plan_for(relabelled, len(present), min(visits, len(present)))
    if made is None:
        return None
    plan, live = made
    back = tuple(PlannedMicrobatch(mb.id, tuple(replace(h, stage=present[h.stage]) for h in mb.path))
                 for mb in plan.microbatches)
    return replace(plan, microbatches=back, membership_digest=membership_digest(members)), live
