"""Turn a membership snapshot into a round plan.

With every stage visited (`--visits` equal to `--num-stages`), paths are full pipelines in stage order,
replicas taken in turn. With fewer visits, `routing/` plans SkipPipe paths: skip-aware, balanced and
collision-aware, from the compute times and memory slots the nodes report.
"""

from __future__ import annotations

import hashlib

from protocol.envelope import HopSpec
from protocol.records import NodeRecord, PlannedMicrobatch, RoundPlan
from routing import LiveNode, ProblemError, from_live
from routing import plan as plan_paths

# Link estimates are not measured yet; every pair is priced alike, so the planner balances compute and memory.
UNMEASURED_LINK_S = 0.005


def membership_digest(members: dict[str, NodeRecord]) -> str:
    text = ";".join(f"{p}:{','.join(map(str, r.stages))}@{r.endpoint}" for p, r in sorted(members.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def serving_replicas(members: dict[str, NodeRecord], num_stages: int) -> dict[int, list[NodeRecord]]:
    replicas: dict[int, list[NodeRecord]] = {s: [] for s in range(num_stages)}
    for peer in sorted(members):
        record = members[peer]
        if record.serving:
            for stage in record.stages:
                if stage < num_stages:
                    replicas[stage].append(record)
    return replicas


def choose_planner(members: dict[str, NodeRecord]) -> str | None:
    """The round's planner: the serving data node with the lowest peer id. Every node computes the same."""
    data_nodes = sorted(p for p, r in members.items() if r.serving and 0 in r.stages)
    return data_nodes[0] if data_nodes else None


def full_pipeline_plan(members: dict[str, NodeRecord], round_: int, num_stages: int, microbatches_per_origin: int,
                       planner: str, deadline: float = 0.0) -> RoundPlan | None:
    """None while some stage has no serving replica: no full path exists yet."""
    replicas = serving_replicas(members, num_stages)
    if any(not replicas[s] for s in range(num_stages)):
        return None
    hop = {p: HopSpec(0, p, members[p].endpoint) for p in members}
    planned, mb_id = [], 0
    for origin in replicas[0]:
        for _ in range(microbatches_per_origin):
            path = [HopSpec(0, origin.peer_id, origin.endpoint)]
            for stage in range(1, num_stages):
                chosen = replicas[stage][mb_id % len(replicas[stage])]
                path.append(HopSpec(stage, chosen.peer_id, hop[chosen.peer_id].endpoint))
            path.append(path[0])
            planned.append(PlannedMicrobatch(mb_id, tuple(path)))
            mb_id += 1
    return RoundPlan(round=round_, planner=planner, membership_digest=membership_digest(members),
                     microbatches=tuple(planned), deadline=deadline)


def skip_plan(members: dict[str, NodeRecord], round_: int, num_stages: int, visits: int,
              microbatches_per_origin: int, planner: str, activation_bytes: int,
              deadline: float = 0.0) -> RoundPlan | None:
    """A SkipPipe plan: each microbatch visits `visits` of the stages, stage 0 first and last."""
    replicas = serving_replicas(members, num_stages)
    if any(not replicas[s] for s in range(num_stages)):
        return None
    nodes, hops = [], {}
    for stage, records in replicas.items():
        for record in records:
            node_id = f"{record.peer_id}/{stage}"  # a daemon hosting two stages plans as two nodes
            compute = record.compute_s.get(stage) or max(record.compute_s.values(), default=0.01)
            nodes.append(LiveNode(node_id, compute_s=compute, memory=record.memory_slots, stage=stage))
            hops[node_id] = HopSpec(stage, record.peer_id, record.endpoint)
    try:
        problem = from_live(nodes, [], stages=num_stages, visits=visits, activation_bytes=activation_bytes,
                            microbatches_per_data_node=microbatches_per_origin, missing_link_s=UNMEASURED_LINK_S)
        result = plan_paths(problem, seed=round_)
    except ProblemError as e:
        raise ValueError(f"cannot plan round {round_}: {e}") from e
    planned = tuple(
        PlannedMicrobatch(mb, tuple(hops[problem.node_ids[v]] for v in path))
        for mb, path in sorted(zip(result.mb_ids, result.paths)))
    return RoundPlan(round=round_, planner=planner, membership_digest=membership_digest(members),
                     microbatches=planned, deadline=deadline)
