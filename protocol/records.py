"""DHT key schema and record formats. Every value is plain msgpack-able data, validated on read.

| key                        | subkey          | value                                   |
|----------------------------|-----------------|-----------------------------------------|
| <swarm>/nodes              | peer id         | NodeRecord (heartbeat), or a tombstone   |
| <swarm>/plan/<round>       | planner peer id | RoundPlan                               |
| <swarm>/links              | measuring peer  | LinksRecord: RTT and bandwidth per peer  |
| <swarm>/experts            | domain name     | CatalogueEntry (the swarm's domains)     |
| <swarm>/experts            | `_owner`        | the catalogue owner a member vouches for |
| <swarm>/experts/<domain>   | expert id       | ExpertRecord (manifest + where to fetch) |

Subkeys of the catalogue and of expert records end in their writer's owner marker (protocol/record_auth.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from protocol.codec_names import CODEC_NAMES
from protocol.envelope import HopSpec
from protocol.sync_names import EVERY_ROUND, SYNC_NAMES

RECORD_VERSION = 1


class RecordError(ValueError):
    """A DHT value that does not match its schema; readers skip it."""


def nodes_key(swarm: str) -> str:
    return f"{swarm}/nodes"


def plan_key(swarm: str, round_: int) -> str:
    return f"{swarm}/plan/{round_}"


def catalogue_key(swarm: str) -> str:
    return f"{swarm}/experts"


def experts_key(swarm: str, domain: str) -> str:
    return f"{swarm}/experts/{domain}"


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


class Reach(str, Enum):
    """How peers can open a connection to a node's gRPC endpoint, as the node itself found out
    (node/host/reachability.py). Only a claim: planners still ping every member they plan."""

    UNCHECKED = "unchecked"  # nobody has dialed it back yet (the first node, older versions): pings decide
    DIRECT = "direct"  # a member dialed its announced endpoint back
    HOLE_PUNCHED = "hole-punched"  # reserved: reached through a punched hole (no hole punching here yet)
    RELAYED = "relayed"  # its endpoint is a relay member's port for it (node/relay/); `via` names the relay
    UNREACHABLE = "unreachable"  # no inbound path: it can dial out, but cannot receive hops

    @property
    def receives_hops(self) -> bool:
        """Whether planners may send it hops: peers dial its endpoint, directly or at its relay."""
        return self in (Reach.UNCHECKED, Reach.DIRECT, Reach.RELAYED)


@dataclass(frozen=True)
class NodeRecord:
    """A node's heartbeat: where to reach it and what it can do."""

    peer_id: str
    endpoint: str
    stages: tuple[int, ...]
    compute_s: dict[int, float]  # measured seconds per microbatch forward, per hosted stage
    memory_slots: int
    role: str  # "data" (hosts stage 0), "stage", or "expert" (trains domain experts, hosts no stage)
    version: str
    swarm: str
    round: int  # the round this node works on
    state: NodeState  # planners only use serving nodes
    metrics_url: str = ""
    maddrs: tuple[str, ...] = ()
    heartbeat_time: float = 0.0  # DHT time of the beat that wrote this record
    num_stages: int = 0  # the swarm's pipeline depth as this node runs it (0: not said), for `status`
    codecs: tuple[str, str] = ("raw", "raw")  # preferred (activation, gradient) codecs; the plan decides
    speaks: tuple[str, ...] = ("raw",)  # every codec this node can decode (older nodes: raw only)
    sync: str = EVERY_ROUND  # the sync strategy this node prefers (protocol/sync_names.py); the plan decides
    sync_every: int = 1  # the rounds between syncs it prefers under `outer` (--sync-every); the plan decides
    # By hosted stage, its last sync applied: {"round", "bytes" received, "seconds", "drift"} (for `status`)
    sync_state: dict[int, dict[str, float]] = field(default_factory=dict)
    reach: Reach = Reach.UNCHECKED  # how peers reach its endpoint; older records say nothing: unchecked
    via: str = ""  # when relayed: the peer id of the relay member whose port `endpoint` is
    # Peers this (data) node keeps out of its plans now (node/faults/bans.py), for `status`:
    # {peer: {"offences", "until" (round), "reason", "accuser"}}
    bans: dict[str, dict] = field(default_factory=dict)
    # The work each peer did for this node as it saw it (node/stage/witness.py), for `status`:
    # {peer: {"hops", "tokens", "passed", "failed"}}
    witnessed: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def serving(self) -> bool:
        return self.state is NodeState.SERVING

    @property
    def plannable(self) -> bool:
        """Serving, and not saying it cannot receive hops (a claim that can only take a node out of plans)."""
        return self.serving and self.reach.receives_hops

    def to_value(self) -> dict:
        value = asdict(self)
        value.pop("peer_id")
        value["state"] = self.state.value
        value["reach"] = self.reach.value
        value["stages"] = list(self.stages)
        value["maddrs"] = list(self.maddrs)
        value["codecs"] = list(self.codecs)
        value["speaks"] = list(self.speaks)
        value["compute_s"] = {str(k): v for k, v in self.compute_s.items()}
        value["sync_state"] = {str(k): v for k, v in self.sync_state.items()}
        value["v"] = RECORD_VERSION
        return value

    @classmethod
    def from_value(cls, peer_id: str, value: Any) -> "NodeRecord":
        if not isinstance(value, dict):
            raise RecordError("node record is not a map")
        stages = _require(value, "stages", list)
        if not all(isinstance(s, int) and s >= 0 for s in stages) or (not stages and value.get("role") != "expert"):
            raise RecordError("stages must be non-negative integers (none only for an expert node)")
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
            num_stages=value["num_stages"] if isinstance(value.get("num_stages"), int)
            and not isinstance(value.get("num_stages"), bool) and value["num_stages"] > 0 else 0,
            codecs=_codec_pair(value.get("codecs", ["raw", "raw"]), known_only=False),
            speaks=_codec_names(value.get("speaks", ["raw"])),
            sync=_sync_name(value.get("sync", EVERY_ROUND), known_only=False),
            sync_every=_sync_every(value.get("sync_every", 1)),
            sync_state=_sync_state(value.get("sync_state", {})),
            reach=_reach(value.get("reach", Reach.UNCHECKED.value)),
            via=value["via"] if isinstance(value.get("via"), str) and len(value["via"]) <= 128 else "",
            bans=_bans(value.get("bans", {})),
            witnessed=_witnessed(value.get("witnessed", {})),
        )


MAX_BANS = 64
MAX_WITNESSED = 64  # peers a record says it saw work from
WORK_KEYS = ("hops", "tokens", "passed", "failed")  # a peer's work as its receiver saw it (node/stage/witness.py)


def _witnessed(value: Any) -> dict[str, dict[str, int]]:
    if not isinstance(value, dict) or len(value) > MAX_WITNESSED:
        raise RecordError(f"witnessed must map at most {MAX_WITNESSED} peers to their work")
    out = {}
    for peer, work in value.items():
        if not (isinstance(peer, str) and 0 < len(peer) <= 128 and isinstance(work, dict)
                and set(work) == set(WORK_KEYS)
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in work.values())):
            raise RecordError(f"witnessed entries are peer -> {{{', '.join(WORK_KEYS)}}} counts")
        out[peer] = {k: work[k] for k in WORK_KEYS}
    return out


def _bans(value: Any) -> dict[str, dict]:
    if not isinstance(value, dict) or len(value) > MAX_BANS:
        raise RecordError(f"bans must map at most {MAX_BANS} peers to their ban")
    out = {}
    for peer, ban in value.items():
        if not (isinstance(peer, str) and 0 < len(peer) <= 128 and isinstance(ban, dict)
                and set(ban) == {"offences", "until", "reason", "accuser"}
                and all(isinstance(ban[k], int) and not isinstance(ban[k], bool) and ban[k] >= 0
                        for k in ("offences", "until"))
                and all(isinstance(ban[k], str) and len(ban[k]) <= 256 for k in ("reason", "accuser"))):
            raise RecordError("bans entries are peer -> {offences, until, reason, accuser}")
        out[peer] = dict(ban)
    return out


def _reach(value: Any) -> Reach:
    try:
        return Reach(value)
    except (TypeError, ValueError):
        raise RecordError(f"reach {value!r} is not one of {', '.join(r.value for r in Reach)}") from None


def _sync_name(value: Any, known_only: bool) -> str:
    """A sync strategy's name; a plan may only name one this version speaks."""
    if not isinstance(value, str) or len(value) > 32:
        raise RecordError("sync must be a strategy's name")
    if known_only and value not in SYNC_NAMES:
        raise RecordError(f"sync {value!r} is not one this node speaks ({', '.join(SYNC_NAMES)})")
    return value


MAX_SYNC_EVERY = 1_000_000
SYNC_STATE_KEYS = ("round", "bytes", "seconds", "drift")


def _sync_state(value: Any) -> dict[int, dict[str, float]]:
    if not isinstance(value, dict) or len(value) > 64:
        raise RecordError("sync_state must map a few stages to their last sync")
    out = {}
    for stage, entry in value.items():
        if not (isinstance(stage, str) and stage.isdigit()) or not isinstance(entry, dict) \
                or set(entry) != set(SYNC_STATE_KEYS) \
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in entry.values()):
            raise RecordError(f"sync_state entries are stage -> {{{', '.join(SYNC_STATE_KEYS)}}} numbers")
        out[int(stage)] = {k: entry[k] for k in SYNC_STATE_KEYS}
    return out


def _sync_every(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SYNC_EVERY:
        raise RecordError(f"sync_every must be an integer in 1..{MAX_SYNC_EVERY}")
    return value


def _non_negative_seconds(value: Any, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
        raise RecordError(f"{name} must be a non-negative number")
    return float(value)


def _codec_pair(value: Any, known_only: bool) -> tuple[str, str]:
    """(activation, gradient) codec names; a plan may only name codecs this version speaks."""
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(c, str) for c in value):
        raise RecordError("codecs must be [activation codec, gradient codec]")
    if known_only and not set(value) <= set(CODEC_NAMES):
        raise RecordError(f"codecs {value} include one this node does not speak ({', '.join(CODEC_NAMES)})")
    return value[0], value[1]


def _codec_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise RecordError("speaks must list codec names")
    return tuple(value)


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
    codecs: tuple[str, str] = ("raw", "raw")  # the (activation, gradient) codecs every sender of the round uses
    sync: str = EVERY_ROUND  # how the round's replicas average their gradients (protocol/sync_names.py)
    sync_every: int = 1  # under `outer`: replicas sync after rounds r with (r + 1) % sync_every == 0
    # The simulator's whole round: the iteration, the sync phase for `sync` and the replica groups, and the
    # plan's own overhead (0.0: not predicted).
    predicted_round_s: float = 0.0

    def participants(self) -> set[str]:
        return {hop.peer_id for mb in self.microbatches for hop in mb.path}

    def work_of(self, peer_id: str) -> list[tuple[int, int, int]]:
        """(microbatch, hop, stage) visits this peer serves, the origin's final hop excluded."""
        return [(mb.id, i, hop.stage) for mb in self.microbatches
                for i, hop in enumerate(mb.path[:-1]) if hop.peer_id == peer_id]

    def replicas(self, stage: int) -> set[str]:
        return {hop.peer_id for mb in self.microbatches for hop in mb.path if hop.stage == stage}

    def endpoints(self, stage: int | None = None) -> dict[str, str]:
        """Peer id -> endpoint of every node on the round's paths (only `stage`'s replicas, when given)."""
        return {hop.peer_id: hop.endpoint for mb in self.microbatches for hop in mb.path
                if stage is None or hop.stage == stage}

    def to_value(self) -> dict:
        return {
            "v": RECORD_VERSION, "round": self.round, "planner": self.planner, "digest": self.membership_digest,
            "deadline": self.deadline, "predicted_s": self.predicted_s, "codecs": list(self.codecs),
            "sync": self.sync, "sync_every": self.sync_every, "predicted_round_s": self.predicted_round_s,
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
                   deadline=float(deadline), predicted_s=float(predicted),
                   codecs=_codec_pair(value.get("codecs", ["raw", "raw"]), known_only=True),
                   sync=_sync_name(value.get("sync", EVERY_ROUND), known_only=True),
                   sync_every=_sync_every(value.get("sync_every", 1)),
                   predicted_round_s=_non_negative_seconds(value.get("predicted_round_s", 0.0), "predicted_round_s"))


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
    # By receiving peer id: bytes by kind (protocol.service.KINDS) that this node's calls to it moved, both ways
    traffic: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_value(self) -> dict:
        return {"v": RECORD_VERSION, "time": self.measured_time,
                "to": {peer: [e.rtt_s, e.bandwidth_Bps] for peer, e in self.to.items()},
                "traffic": self.traffic}

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
        traffic = {}
        for peer, kinds in (value.get("traffic") if isinstance(value.get("traffic"), dict) else {}).items():
            if isinstance(peer, str) and isinstance(kinds, dict) and all(
                    isinstance(k, str) and len(k) <= 16 and isinstance(n, int) and not isinstance(n, bool) and n >= 0
                    for k, n in kinds.items()):
                traffic[peer] = dict(kinds)
            else:
                skipped += 1
        when = value.get("time", 0.0)
        return cls(peer_id, to, float(when) if isinstance(when, (int, float)) else 0.0, traffic), skipped


def _number(value: dict, name: str) -> float:
    item = value.get(name)
    if not isinstance(item, (int, float)) or isinstance(item, bool):
        raise RecordError(f"field {name!r} missing or not a number")
    return float(item)


def _sha256(value: dict, name: str) -> str:
    item = _require(value, name, str)
    if len(item) != 64 or any(c not in "0123456789abcdef" for c in item):
        raise RecordError(f"field {name!r} is not a hex sha256")
    return item


def _domain_name(name: str) -> str:
    if not name or "/" in name or name.startswith(("_", "*")):
        raise RecordError(f"domain name {name!r} must be non-empty without '/' and not start with '_' or '*'")
    return name


# zlib costs at most about 8.1 bits per byte (incompressible input plus framing); more is no measurement.
MAX_DIFFICULTY = 16.0
SEED_DOMAIN = "*"  # the domain of seed experts, which every expert may branch from
VOUCH = "_owner"  # the catalogue subkey under which a member names the catalogue owner it trusts


def seed_id(weights_sha256: str) -> str:
    """A seed expert's id names its weights, so the id cannot be moved to other bytes."""
    return f"seed-{weights_sha256[:12]}"


@dataclass(frozen=True)
class CatalogueEntry:
    """One domain of the swarm's catalogue: what to train on, and how to tell that a node holds the same text."""

    name: str
    source: str  # where the text comes from (a path, or the offline corpus's source description)
    sha256: str  # of the domain's tokens: equal hashes mean equal bytes
    tokens: int
    difficulty: float  # model-free zlib bits per byte; sizing and the FLOPs shares weigh domains by it
    seed: str = ""  # id of the seed expert to branch from ("": the pipeline's weights or the preset's init)
    seed_sha256: str = ""  # the seed's weights: a record or a file with other bytes is refused

    def to_value(self) -> dict:
        value = asdict(self)
        value.pop("name")
        value["v"] = RECORD_VERSION
        return value

    @classmethod
    def from_value(cls, name: str, value: Any) -> "CatalogueEntry":
        if not isinstance(value, dict):
            raise RecordError("catalogue entry is not a map")
        difficulty = _number(value, "difficulty")
        tokens = _require(value, "tokens", int)
        if not 0 < difficulty <= MAX_DIFFICULTY or tokens <= 0:
            raise RecordError(f"difficulty must be in (0, {MAX_DIFFICULTY}] and tokens positive")
        seed, seed_sha256 = value.get("seed", ""), value.get("seed_sha256", "")
        if not isinstance(seed, str) or not isinstance(seed_sha256, str):
            raise RecordError("seed and seed_sha256 must be strings")
        if seed and seed != seed_id(_sha256(value, "seed_sha256")):
            raise RecordError(f"seed {seed!r} is not the id of weights {seed_sha256[:12]}...")
        if seed_sha256 and not seed:
            raise RecordError("seed_sha256 without a seed")
        return cls(name=_domain_name(name), source=_require(value, "source", str), sha256=_sha256(value, "sha256"),
                   tokens=tokens, difficulty=difficulty, seed=seed, seed_sha256=seed_sha256)


def vouch_value(owner: str) -> dict:
    """A member's word on whose catalogue it trusts; joiners that came in through it take that word."""
    return {"owner": owner, "v": RECORD_VERSION}


def vouched_owner(value: Any) -> str:
    if not isinstance(value, dict):
        raise RecordError("catalogue owner note is not a map")
    owner = _require(value, "owner", str)
    if not owner:
        raise RecordError("catalogue owner note names no peer")
    return owner


# The node's fields of an expert record; the rest of the value is the expert's manifest (experts/manifest.py).
_SERVED_BY = ("id", "peer_id", "endpoint", "bytes", "dev_loss", "v")


@dataclass(frozen=True)
class ExpertRecord:
    """A published expert: its manifest, and the peer that serves its weights over FetchExpert."""

    id: str
    peer_id: str
    endpoint: str  # host:port of the trainer's gRPC server
    bytes: int  # size of model.safetensors
    dev_loss: float | None  # nats per token on the domain's dev split
    manifest: dict  # name, domain, config, tokenizer, lineage, steps, flops, weights_sha256, ... as trained

    @property
    def domain(self) -> str:
        return self.manifest["domain"]

    @property
    def sha256(self) -> str:
        return self.manifest["weights_sha256"]

    @property
    def steps(self) -> int:
        return self.manifest["steps"]

    @property
    def target_steps(self) -> int:
        return self.manifest["target_steps"]

    @property
    def flops(self) -> float:
        return float(self.manifest["flops"])

    @property
    def complete(self) -> bool:
        return self.steps >= self.target_steps

    @property
    def planned_flops(self) -> float:
        """What its trainer says the whole expert will cost (0 when it says nothing)."""
        extra = self.manifest.get("extra")
        planned = extra.get("planned_flops", 0.0) if isinstance(extra, dict) else 0.0
        return float(planned) if isinstance(planned, (int, float)) and not isinstance(planned, bool) else 0.0

    def binding_error(self) -> str | None:
        """Why the id does not belong to this record, or None: a seed's id names its weights, any other expert's
        id its publisher (`<domain>-<last 8 characters of the peer id>-<n>`)."""
        if self.domain == SEED_DOMAIN:
            return None if self.id == seed_id(self.sha256) else \
                f"seed id {self.id!r} does not name its weights {self.sha256[:12]}..."
        if not self.id.startswith(f"{self.domain}-{self.peer_id[-8:]}-"):
            return f"expert id {self.id!r} does not name its publisher ...{self.peer_id[-8:]}"
        return None

    def to_value(self) -> dict:
        return {**self.manifest, "id": self.id, "peer_id": self.peer_id, "endpoint": self.endpoint,
                "bytes": self.bytes, "dev_loss": self.dev_loss, "v": RECORD_VERSION}

    def summary(self) -> dict:
        """The fields `experts list --json` prints first."""
        return {"id": self.id, "domain": self.domain, "sha256": self.sha256, "bytes": self.bytes,
                "steps": self.steps, "target_steps": self.target_steps, "flops": self.flops,
                "dev_loss": self.dev_loss, "peer_id": self.peer_id, "endpoint": self.endpoint}

    @classmethod
    def from_value(cls, subkey: str, value: Any) -> "ExpertRecord":
        if not isinstance(value, dict):
            raise RecordError("expert record is not a map")
        expert_id = _require(value, "id", str)
        if expert_id != subkey:
            raise RecordError(f"expert id {expert_id!r} is not its subkey {subkey!r}")
        manifest = {k: v for k, v in value.items() if k not in _SERVED_BY}
        _require(manifest, "domain", str)
        _require(manifest, "config", dict)
        _require(manifest, "tokenizer", str)
        _require(manifest, "format", str)
        _sha256(manifest, "weights_sha256")
        steps, target = _require(manifest, "steps", int), _require(manifest, "target_steps", int)
        lineage = _require(manifest, "lineage", list)
        if steps < 0 or target <= 0 or not all(isinstance(h, str) for h in lineage):
            raise RecordError("steps, target_steps or lineage are malformed")
        _number(manifest, "flops")
        size = _require(value, "bytes", int)
        dev_loss = value.get("dev_loss")
        if dev_loss is not None:
            dev_loss = _number(value, "dev_loss")
        if size <= 0:
            raise RecordError("bytes must be positive")
        return cls(id=expert_id, peer_id=_require(value, "peer_id", str), endpoint=_require(value, "endpoint", str),
                   bytes=size, dev_loss=dev_loss, manifest=manifest)
