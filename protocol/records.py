"""DHT key schema and record formats. Every value is plain msgpack-able data, validated on read.

| key                        | subkey          | value                                   |
|----------------------------|-----------------|-----------------------------------------|
| <swarm>/nodes              | peer id         | NodeRecord (heartbeat), or a tombstone   |
| <swarm>/plan/<round>       | planner peer id | RoundPlan                               |
| <swarm>/avg/<stage>/<round>| peer id         | microbatches this replica processed     |
| <swarm>/links              | measuring peer  | LinksRecord: RTT and bandwidth per peer  |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

from protocol.envelope import HopSpec

RECORD_VERSION = 1


class RecordError(ValueError):
    """A DHT value that does not match its schema; readers skip it."""


def nodes_key(swarm: str) -> str:
    return f"{swarm}/nodes"


def plan_key(swarm: str, round_: int) -> str:
    return f"{swarm}/plan/{round_}"


def averaging_key(swarm: str, stage: int, round_: int) -> str:
    return f"{swarm}/avg/{stage}/{round_}"


def _require(value: dict, name: str, kind: type) -> Any:
    """value[name], which must be a `kind` (a bool is not accepted as an int)."""
    item = value.get(name)
    if not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
        raise RecordError(f"field {name!r} missing or not {kind.__name__}")
    return item


class NodeState(str, Enum):
    """Where a node is in its life, announced in its record (Petals' ServerState)."""

    JOINING = "joining"  # up, but copying its stages' state from a replica: not planned yet
    SERVING = "serving"  # takes part in rounds
    DRAINING = "draining"  # stopping: finishes nothing new, is left out of plans
    LEFT = "left"  # gone; only its tombstone says so


@dataclass(frozen=True)
class NodeRecord:
    """A node's heartbeat: where to reach it and what it can do."""

    peer_id: str
    endpoint: str
    stages: tuple[int, ...]
    compute_s: dict[int, float]  # measured seconds per microbatch forward, per hosted stage
    memory_slots: int
    role: str  # "data" (hosts stage 0) or "stage"
    version: str
    swarm: str
    round: int  # the round this node works on
    state: NodeState  # planners only use serving nodes
    metrics_url: str = ""
    maddrs: tuple[str, ...] = ()
    heartbeat_time: float = 0.0  # DHT time of the beat that wrote this record

    @property
    def serving(self) -> bool:
        return self.state is NodeState.SERVING

    def to_value(self) -> dict:
        value = asdict(self)
        value.pop("peer_id")
        value["state"] = self.state.value
        value["stages"] = list(self.stages)
        value["maddrs"] = list(self.maddrs)
        value["compute_s"] = {str(k): v for k, v in self.compute_s.items()}
        value["v"] = RECORD_VERSION
        return value

    @classmethod
    def from_value(cls, peer_id: str, value: Any) -> "NodeRecord":
        if not isinstance(value, dict):
            raise RecordError("node record is not a map")
        stages = _require(value, "stages", list)
        if not stages or not all(isinstance(s, int) and s >= 0 for s in stages):
            raise RecordError("stages must be non-negative integers")
        compute = _require(value, "compute_s", dict)
        try:
            compute_s = {int(k): float(v) for k, v in compute.items()}
        except (TypeError, ValueError):
            raise RecordError("compute_s must map stage to seconds") from None
        return cls(
            peer_id=peer_id,
            endpoint=_require(value, "endpoint", str),
            stages=tuple(stages),
            compute_s=compute_s,
            memory_slots=_require(value, "memory_slots", int),
            role=_require(value, "role", str),
            version=_require(value, "version", str),
            swarm=_require(value, "swarm", str),
            round=_require(value, "round", int),
            state=_node_state(_require(value, "state", str)),
            metrics_url=value.get("metrics_url", "") if isinstance(value.get("metrics_url", ""), str) else "",
            maddrs=tuple(m for m in value.get("maddrs", []) if isinstance(m, str)),
            heartbeat_time=float(value.get("heartbeat_time", 0.0)) if isinstance(value.get("heartbeat_time"),
                                                                                  (int, float)) else 0.0,
        )


def _node_state(text: str) -> NodeState:
    try:
        return NodeState(text)
    except ValueError:
        raise RecordError(f"state {text!r} is not one of {', '.join(s.value for s in NodeState)}") from None


TOMBSTONE = {"left": True, "state": NodeState.LEFT.value}


def is_tombstone(value: Any) -> bool:
    return isinstance(value, dict) and value.get("left") is True


@dataclass(frozen=True)
class PlannedMicrobatch:
    id: int
    path: tuple[HopSpec, ...]  # origin first and last

    @property
    def origin(self) -> str:
        return self.path[0].peer_id


@dataclass(frozen=True)
class RoundPlan:
    """The paths every microbatch of one round takes. Published by the round's planner."""

    round: int
    planner: str
    membership_digest: str
    microbatches: tuple[PlannedMicrobatch, ...]
    deadline: float = 0.0  # DHT time by which every node ends the round, so nobody falls a round behind
    predicted_s: float = 0.0  # the simulator's iteration time for this plan with the links the planner knew

    def participants(self) -> set[str]:
        return {hop.peer_id for mb in self.microbatches for hop in mb.path}

    def work_of(self, peer_id: str) -> list[tuple[int, int, int]]:
        """(microbatch, hop, stage) visits this peer serves, the origin's final hop excluded."""
        return [(mb.id, i, hop.stage) for mb in self.microbatches
                for i, hop in enumerate(mb.path[:-1]) if hop.peer_id == peer_id]

    def replicas(self, stage: int) -> set[str]:
        return {hop.peer_id for mb in self.microbatches for hop in mb.path if hop.stage == stage}

    def to_value(self) -> dict:
        return {
            "v": RECORD_VERSION, "round": self.round, "planner": self.planner, "digest": self.membership_digest,
            "deadline": self.deadline, "predicted_s": self.predicted_s,
            "microbatches": [{"id": mb.id, "path": [[h.stage, h.peer_id, h.endpoint] for h in mb.path]}
                             for mb in self.microbatches],
        }

    @classmethod
    def from_value(cls, value: Any) -> "RoundPlan":
        if not isinstance(value, dict):
            raise RecordError("plan is not a map")
        mbs = []
        for item in _require(value, "microbatches", list):
            if not isinstance(item, dict) or not isinstance(item.get("id"), int):
                raise RecordError("microbatch entry needs an integer id")
            path = item.get("path")
            if not isinstance(path, list) or len(path) < 2:
                raise RecordError("microbatch path must list at least the origin twice")
            hops = []
            for hop in path:
                if (not isinstance(hop, list) or len(hop) != 3 or not isinstance(hop[0], int)
                        or not isinstance(hop[1], str) or not isinstance(hop[2], str)):
                    raise RecordError("a hop is [stage, peer id, endpoint]")
                hops.append(HopSpec(*hop))
            mbs.append(PlannedMicrobatch(item["id"], tuple(hops)))
        deadline = value.get("deadline", 0.0)
        if not isinstance(deadline, (int, float)) or isinstance(deadline, bool):
            raise RecordError("deadline must be a number")
        predicted = value.get("predicted_s", 0.0)
        if not isinstance(predicted, (int, float)) or isinstance(predicted, bool):
            raise RecordError("predicted_s must be a number")
        return cls(round=_require(value, "round", int), planner=_require(value, "planner", str),
                   membership_digest=_require(value, "digest", str), microbatches=tuple(mbs),
                   deadline=float(deadline), predicted_s=float(predicted))


# ---- measured links (skippipe) ------------------------------------------------------------------------------
def links_key(swarm: str) -> str:
    return f"{swarm}/links"


@dataclass(frozen=True)
class LinkEstimate:
    """One direction of a link as its sender measured it (EWMA-smoothed)."""

    rtt_s: float  # round trip of a small Ping
    bandwidth_Bps: float  # bytes per second of real hops, latency removed

    def usable(self) -> bool:
        """False for absurd values (negative, zero or non-finite): the planner uses its default instead."""
        return 0 <= self.rtt_s < 60 and 0 < self.bandwidth_Bps < 1e13


@dataclass(frozen=True)
class LinksRecord:
    """What one node measured to the peers it sends to: `<swarm>/links`, under the measuring peer's owner subkey."""

    peer_id: str
    to: dict[str, LinkEstimate]  # by receiving peer id
    measured_time: float = 0.0  # DHT time of the measurement

    def to_value(self) -> dict:
        return {"v": RECORD_VERSION, "time": self.measured_time,
                "to": {peer: [e.rtt_s, e.bandwidth_Bps] for peer, e in self.to.items()}}

    @classmethod
    def from_value(cls, peer_id: str, value: Any) -> tuple["LinksRecord", int]:
        """The record and how many of its entries were malformed (skipped). RecordError if it is not a map."""
        if not isinstance(value, dict) or not isinstance(value.get("to"), dict):
            raise RecordError("links record is not a map with a 'to' map")
        to, skipped = {}, 0
        for peer, entry in value["to"].items():
            ok = (isinstance(peer, str) and isinstance(entry, list) and len(entry) == 2
                  and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in entry))
            if ok:
                to[peer] = LinkEstimate(float(entry[0]), float(entry[1]))
            else:
                skipped += 1
        when = value.get("time", 0.0)
        return cls(peer_id, to, float(when) if isinstance(when, (int, float)) else 0.0), skipped
