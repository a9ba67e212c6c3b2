"""Envelopes and paths. A hop learns where to send next only from the path it carries.

A path is [origin, hop_1, ..., hop_k, origin]: the origin is a stage-0 data node, each stage is
visited at most once, and stages may be skipped or appear in any order (SkipPipe swaps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from protocol.errors import ProtocolError, invalid
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.limits import WireLimits


@dataclass(frozen=True)
class HopSpec:
    stage: int
    peer_id: str
    endpoint: str

    def to_pb(self) -> pb.Hop:
        return pb.Hop(stage=self.stage, peer_id=self.peer_id, endpoint=self.endpoint)


def make_envelope(swarm_id: str, round_: int, microbatch: int, path: Sequence[HopSpec], hop: int,
                  auth: bytes = b"", attempt: int = 0) -> pb.Envelope:
    return pb.Envelope(swarm_id=swarm_id, round=round_, microbatch=microbatch,
                       path=[h.to_pb() for h in path], hop=hop, auth=auth, attempt=attempt)


def path_of(env: pb.Envelope) -> tuple[HopSpec, ...]:
    return tuple(HopSpec(h.stage, h.peer_id, h.endpoint) for h in env.path)


def check_path(path: Sequence[pb.Hop], num_stages: int, limits: WireLimits) -> None:
    """Structural rules every path obeys, whatever the planner chose."""
    if len(path) < 2:
        raise invalid("path must list the origin first and last")
    if len(path) > limits.max_path_hops:
        raise invalid(f"path of {len(path)} hops exceeds the limit of {limits.max_path_hops}")
    first, last = path[0], path[-1]
    if first.stage != 0 or last.stage != 0 or first.peer_id != last.peer_id:
        raise invalid("path must start and end at the same stage-0 origin")
    middle = [h.stage for h in path[1:-1]]
    if any(not 0 < s < num_stages for s in middle):
        raise invalid(f"path visits a stage outside 1..{num_stages - 1}: {middle}")
    if len(set(middle)) != len(middle):
        raise invalid(f"path visits a stage twice: {middle}")
    if any(not h.peer_id or not h.endpoint for h in path):
        raise invalid("every hop needs a peer id and an endpoint")


def check_envelope(env: pb.Envelope, *, swarm_id: str, peer_id: str, stages: Sequence[int], num_stages: int,
                   limits: WireLimits) -> None:
    """Is this envelope addressed to this node, in this swarm, at a hop it can serve?"""
    if env.swarm_id != swarm_id:
        raise ProtocolError(grpc.StatusCode.PERMISSION_DENIED,
                            f"swarm id {env.swarm_id!r} is not this node's swarm {swarm_id!r}")
    check_path(env.path, num_stages, limits)
    if not 0 <= env.hop < len(env.path):
        raise invalid(f"hop index {env.hop} is outside the path of {len(env.path)} hops")
    hop = env.path[env.hop]
    if hop.peer_id != peer_id:
        raise invalid(f"hop {env.hop} is addressed to peer {hop.peer_id}, not to this node")
    if hop.stage not in stages:
        raise invalid(f"hop {env.hop} asks for stage {hop.stage}, which this node does not host")
    if env.round < 0 or env.microbatch < 0 or env.attempt < 0:
        raise invalid("round, microbatch and attempt must be non-negative")


def at_hop(env: pb.Envelope, hop: int) -> pb.Envelope:
    """The same envelope, addressed to another hop of its path."""
    moved = pb.Envelope()
    moved.CopyFrom(env)
    moved.hop = hop
    return moved


def is_final_hop(env: pb.Envelope) -> bool:
    return env.hop == len(env.path) - 1
