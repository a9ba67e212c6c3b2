"""Node settings: one nested, typed config, the only source of the daemon's tuning numbers.

Each subsystem has a section (`NodeConfig.network`, `.faults`, ...) and each setting is declared once, with
its default, its parser and its documentation, by `setting(...)` at its field. Flags (`--probe-timeout`),
TOML keys (flat `probe-timeout = 1`, or `[faults]` then `probe_timeout = 1`) and `SWARM_NODE_*`
environment variables are all derived from those declarations, so they can never disagree on names or
types. A subsystem is handed its own section, never a copy of its fields.

Precedence: defaults < `--config` TOML < `SWARM_NODE_*` environment < flags.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from node.errors import UsageError
from node.faults.misbehave import KINDS as MISBEHAVE_KINDS
from protocol.codec_names import CODEC_NAMES
from protocol.sync_names import EVERY_ROUND, SYNC_NAMES

ENV_PREFIX = "SWARM_NODE_"


# ---- parsers: each turns a flag, TOML or environment value into the field's type, or says what is wrong ----------

def _number(kind: type, what: str) -> Callable[[Any], Any]:
    """A parser for ints or floats that refuses booleans (TOML's `true` is not a port)."""
    def parse(value: Any):
        if isinstance(value, bool):
            raise ValueError(f"must be {what}")
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be {what}") from None
    return parse


def _within(parse: Callable[[Any], Any], ok: Callable[[Any], bool], message: str) -> Callable[[Any], Any]:
    def check(value: Any):
        parsed = parse(value)
        if not ok(parsed):
            raise ValueError(message)
        return parsed
    return check


_int = _number(int, "an integer")
_float = _number(float, "a number")
_positive_int = _within(_int, lambda n: n > 0, "must be a positive integer")
_non_negative_int = _within(_int, lambda n: n >= 0, "must be zero or a positive integer")
_port = _within(_int, lambda n: 0 <= n <= 65535, "must be a port number between 0 (pick a free one) and 65535")
_positive_float = _within(_float, lambda x: x > 0, "must be a positive number")
_non_negative_float = _within(_float, lambda x: x >= 0, "must be zero or positive")
_fraction = _within(_float, lambda x: 0 < x <= 1, "must be a number in (0, 1]")


def _peer_id(value: Any) -> str:
    """A libp2p peer id in base58 ("" for none)."""
    text = str(value)
    if text and not (30 <= len(text) <= 64 and set(text) <= set(_BASE58)):
        raise ValueError(f"{text!r} is not a peer id (base58, as in the /p2p/ part of a multiaddr)")
    return text


_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _str_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v for v in value.replace(",", " ").split() if v]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError("must be a list of strings")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _stages(value: Any) -> str:
    text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value).strip()
    if text == "auto":
        return text
    try:
        stages = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError("must be 'auto' or stage numbers like 0 or 2,3") from None
    if not stages or any(s < 0 for s in stages) or len(set(stages)) != len(stages):
        raise ValueError("must be 'auto' or distinct non-negative stage numbers like 0 or 2,3")
    return ",".join(str(s) for s in stages)


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if str(value) not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return str(value)
    return parse


def _device(value: Any) -> str:
    text = str(value)
    if text in ("auto", "cpu") or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise ValueError("must be auto, cpu, cuda or cuda:<index>")


def _emulation_file(value: Any) -> str:
    """A link-emulation file, read and checked now so a malformed one stops the node at once."""
    text = str(value)
    if text:
        from node.dataplane.link_emulation import LinkEmulator  # stdlib only

        LinkEmulator.load(text)  # EmulationError is a ValueError with a one-line reason
    return text


def setting(default: Any, help: str, parse: Callable[[Any], Any] = str, flag: str = "", kind: str = "value",
            metavar: str | None = None) -> Any:
    """Declare one setting: its default, its documentation (the flag's help), and how a value is parsed.

    `flag` names the flag when it is not the field's name (`--expert-dir` for `experts.dir`); `kind` is
    "value", "list" (nargs=+), "repeat" (repeatable, nargs=+) or "switch" (store_true)."""
    meta = {"help": help, "parse": parse, "flag": flag, "kind": kind, "metavar": metavar}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---- the sections -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SwarmConfig:
    """Which swarm, how to reach it, and this node's presence in its DHT (node/control/discovery.py)."""

    id: str = setting("swarm-node", "swarm id: namespaces every DHT key; nodes of other swarms are refused",
                      flag="swarm")
    new_swarm: bool = setting(False, "start a new swarm instead of joining one", _bool, kind="switch")
    initial_peers: list[str] = setting([], "multiaddrs of peers already in the swarm", _str_list, kind="list",
                                       metavar="MADDR")
    swarm_key: str = setting("", "swarm key file (make one with 'swarm-node keygen PATH'): a private swarm that "
                                 "only holders of the key can join; empty: a public swarm")
    heartbeat_interval: float = setting(2.0, "seconds between DHT heartbeats", _positive_float)
    record_ttl: float = setting(8.0, "seconds a DHT record lives unless refreshed", _positive_float)
    # Loopback reads take milliseconds, WAN reads well under a second.
    dht_read_timeout: float = setting(5.0, "seconds a DHT read (members, plans, links) may take; a slower read "
                                           "counts as finding nothing new, so a hung DHT process never blocks "
                                           "the node", _positive_float)
    dht_write_timeout: float = setting(1.0, "seconds a heartbeat or the leaving tombstone may take to reach the "
                                            "DHT before it counts as failed", _positive_float)
    min_nodes: int = setting(0, "plan no round until this many nodes serve (a local swarm starting together)",
                             _int)


@dataclass(frozen=True)
class NetworkConfig:
    """Addresses, ports, identity and TLS of this node's servers (node/host/)."""

    host: str = setting("127.0.0.1", "address to serve gRPC, metrics and the DHT on")
    announce_host: str = setting("", "address other peers use to reach this node (default: --host)")
    port: int = setting(0, "gRPC port (0 picks a free one)", _port)
    announce_port: int = setting(0, "gRPC port other peers reach this node on, behind NAT or port forwarding "
                                    "(0: --port)", _port)
    dht_port: int = setting(0, "DHT (libp2p) port (0 picks a free one)", _port)
    metrics_port: int = setting(0, "Prometheus /metrics port (0 picks a free one)", _port)
    identity_path: str = setting("", "private key file; keeps the peer id stable across restarts")
    reachability_timeout: float = setting(10.0, "seconds a joining node waits for a member to dial it back "
                                                "(its gRPC endpoint and DHT addresses)", _positive_float)
    reachability_recheck: float = setting(300.0, "seconds between a joined node's reachability checks after the "
                                                 "first, so that a port forwarded later is noticed (0: check once)",
                                          _non_negative_float)
    tls: bool = setting(False, "serve and dial gRPC over TLS with a certificate derived from --swarm-key", _bool,
                        kind="switch")
    tls_cert: str = setting("", "TLS certificate (PEM) every node of the swarm serves and trusts; with --tls-key")
    tls_key: str = setting("", "private key (PEM) of --tls-cert")


@dataclass(frozen=True)
class RelayConfig:
    """Carrying connections to members behind NAT (node/relay/, docs/nat.md). A directly reachable node relays
    unless --relay-limit is 0; a node that finds itself unreachable attaches to one that relays."""

    limit: float = setting(64.0, "MiB/s this node relays for members behind NAT, all of them together "
                                 "(0: relay for nobody)", _non_negative_float, flag="relay_limit")
    port: int = setting(0, "TCP port relayed members dial back on (0 picks a free one); members attached get "
                           "the ports after it, one each (0: any free ones)", _port, flag="relay_port")
    nodes: int = setting(4, "members behind NAT this node relays for at once (each holds one of its --grpc-workers)",
                         _positive_int, flag="relay_nodes")
    connections: int = setting(16, "open connections relayed to one member at once", _positive_int,
                               flag="relay_connections")
    tunnel_timeout: float = setting(5.0, "seconds a relayed connection waits for its member to take it, an "
                                         "attach for the relay's answer, and a member whose relay went for the "
                                         "next before it announces itself unreachable", _positive_float,
                                    flag="relay_tunnel_timeout")


@dataclass(frozen=True)
class ModelConfig:
    """The model the swarm trains and where this node runs it (lm/, node/model.py)."""

    name: str = setting("tiny", "tiny, llama-160m, llama-500m, llama-1b, llama-8b or an HF checkpoint directory",
                        flag="model")
    num_stages: int = setting(4, "pipeline depth of the swarm's model", _positive_int)
    device: str = setting("auto", "auto, cpu or cuda[:i]", _device)
    dtype: str = setting("auto", "auto, float32, bfloat16 or float16",
                         _choice("auto", "float32", "bfloat16", "float16"))
    tokenizer: str = setting("", "HF tokenizer directory (default: the built-in byte tokenizer)")
    seed: int = setting(0, "seed for model init and data sampling", _int)
    torch_threads: int = setting(0, "torch intra-op threads (0: torch's default)", _int)


@dataclass(frozen=True)
class DataConfig:
    """What data nodes train on, and the shape of a microbatch (lm/data.py)."""

    paths: list[str] = setting([], "text or jsonl training files (data nodes)", _str_list, flag="data",
                               kind="list", metavar="PATH")
    dataset: str = setting("", "HF dataset NAME[:config] (needs internet or a local cache)")
    seq_len: int = setting(64, "tokens per sequence", _positive_int)
    batch_size: int = setting(4, "sequences per microbatch", _positive_int)


@dataclass(frozen=True)
class TrainingConfig:
    """The optimizer, how long to train, and what is saved (node/stage/trainer.py, node/control/checkpoint.py)."""

    lr: float = setting(3e-3, "AdamW learning rate", _positive_float)
    weight_decay: float = setting(0.01, "AdamW weight decay", _non_negative_float)
    grad_clip: float = setting(1.0, "gradient norm clip", _positive_float)
    warmup_rounds: float = setting(2.0, "rounds of linear learning-rate warm-up", _non_negative_float)
    rounds: int = setting(0, "stop after this many rounds (0: train until stopped)", _int)
    checkpoint_dir: str = setting("", "save hosted stages here (and resume from here); empty: no checkpoints")
    checkpoint_every: int = setting(5, "rounds between checkpoints", _positive_int)
    save_model: str = setting("", "after the last round (--rounds), write each hosted stage into this HF "
                                  "LlamaForCausalLM checkpoint directory (safetensors, one shard per stage; "
                                  "lm/whole.py)", metavar="DIR")


@dataclass(frozen=True)
class SyncConfig:
    """How a stage's replicas keep their weights together (node/sync/). This node's preference: the planner
    picks the strategy and the sync interval most members prefer, and every replica of a round follows the
    plan (node/sync/agreement.py). The outer optimizer's numbers are DiLoCo's (arXiv 2311.08105)."""

    strategy: str = setting(EVERY_ROUND, "how replicas sync: every-round (average gradients each round by "
                                         "reduce-scatter, then all-gather: about 2G(n-1)/n bytes a replica), "
                                         "all-to-all (each pulls every other's whole gradient: (n-1)G), or outer "
                                         "(local steps; every --sync-every rounds average the compressed "
                                         "pseudo-gradients and take an outer Nesterov step)",
                            _choice(*SYNC_NAMES), flag="sync")
    every: int = setting(8, "outer: inner rounds between syncs (H)", _positive_int, flag="sync_every")
    outer_lr: float = setting(0.7, "outer: the outer Nesterov step's learning rate", _positive_float)
    outer_momentum: float = setting(0.9, "outer: the outer Nesterov step's momentum",
                                    _within(_float, lambda x: 0 <= x < 1, "must be a number in [0, 1)"))
    codec: str = setting("int8", "outer: the codec of pseudo-gradients on the wire (error feedback keeps what it "
                                 "loses for the next sync)", _choice("raw", "bf16", "int8", "int4"), flag="sync_codec")
    outlier_ratio: float = setting(10.0, "with 3 or more replicas, one whose gradient (or pseudo-gradient) norm per "
                                         "microbatch exceeds this many times the group's median is left out of the "
                                         "average (every replica of a swarm should use the same value)",
                                   _within(_float, lambda x: x > 1, "must be a number above 1"))


@dataclass(frozen=True)
class RoleConfig:
    """Which role a node takes, and when it changes (node/roles/choice.py)."""

    role: str = setting("auto", "stage, expert, or auto: a stage while one has fewer than --min-replicas live "
                                "replicas, else experts", _choice("auto", "stage", "expert"))
    stages: str = setting("auto", "stages to host: 0, 2,3 or auto (the stage with the fewest replicas)", _stages)
    min_replicas: int = setting(1, "live replicas per stage an auto node keeps before training experts",
                                _positive_int)
    idle_rounds: int = setting(3, "rounds an auto stage node may be left out of plans before it trains experts",
                               _positive_int)

    def hosted_stages(self) -> list[int] | None:
        """The explicit stage list, or None for `auto`."""
        return None if self.stages == "auto" else [int(s) for s in self.stages.split(",")]


@dataclass(frozen=True)
class RoundConfig:
    """Rounds: how a plan is made and awaited, what it asks of a node, and averaging (node/control/rounds.py)."""

    visits: int = setting(0, "stages each microbatch visits, stage 0 included (SkipPipe); 0: all of them", _int)
    microbatches: int = setting(4, "microbatches each data node feeds per round", _positive_int)
    max_inflight: int = setting(2, "microbatches a data node keeps in flight at once", _positive_int)
    memory_slots: int = setting(8, "microbatches whose activations this node may hold at once", _positive_int)
    round_timeout: float = setting(120.0, "seconds a round may take before its stragglers are dropped",
                                   _positive_float)
    plan_poll: float = setting(0.2, "seconds between plan lookups while waiting for a round's plan",
                               _positive_float)
    plan_wait_log: float = setting(30.0, "seconds between 'waiting for the plan' log lines", _positive_float)
    plan_ttl_min: float = setting(60.0, "the least seconds a published plan (or link estimate) lives in the DHT",
                                  _positive_float)
    plan_ttl_rounds: float = setting(4.0, "a published plan (or link estimate) lives this many --round-timeout",
                                     _positive_float)
    averaging_grace_min: float = setting(3.0, "the least seconds a slower replica is waited for when averaging",
                                         _positive_float)
    averaging_overrun_max: float = setting(10.0, "the most seconds averaging may run past the round's deadline, "
                                                 "at most half --round-timeout", _positive_float)
    compute_smoothing: float = setting(0.2, "weight of a new sample in the per-stage compute-time average",
                                       _fraction)
    overhead_smoothing: float = setting(0.3, "weight of a new sample in the average of a round's overhead (its time "
                                             "beyond the plan's work and the sync), which plans predict with",
                                        _fraction)
    memory_retry: float = setting(0.05, "seconds between tries to start a microbatch while activation memory "
                                        "is full", _positive_float)

    def plan_ttl(self) -> float:
        """Seconds a published plan lives: long enough for late joiners and catch-ups to read it."""
        return max(self.plan_ttl_min, self.plan_ttl_rounds * self.round_timeout)


@dataclass(frozen=True)
class DataPlaneConfig:
    """The gRPC data plane: workers, stream limits, admission and codecs (node/dataplane/, node/host/)."""

    grpc_workers: int = setting(16, "threads serving incoming RPCs", _positive_int)
    send_workers: int = setting(4, "threads delivering finished hops to the next peer", _positive_int)
    stream_idle_timeout: float = setting(10.0, "seconds a Forward/Backward stream may stay silent before it is "
                                               "cancelled (frees the gRPC worker a silent client holds)",
                                         _positive_float)
    stream_reserve: int = setting(4, "gRPC workers kept free of Forward/Backward streams for short calls",
                                  _positive_int)
    streams_per_peer: int = setting(16, "Forward/Backward streams one address may hold open at once",
                                    _positive_int)
    send_retry_first: float = setting(0.02, "seconds before the first retry of a send the receiver refused for now "
                                            "(busy, or not ready); the wait doubles with each retry",
                                      _positive_float)
    send_retry_max: float = setting(1.0, "the longest wait between retries of a send", _positive_float)
    plans_kept: int = setting(4, "round plans admission keeps for checking incoming hops", _positive_int)
    plan_lookup_retry: float = setting(0.5, "seconds between DHT lookups of a plan admission lacks, or of the "
                                            "members when a path names one at an endpoint it does not know",
                                       _positive_float)
    members_refresh: float = setting(2.0, "seconds admission reuses the verified member list", _positive_float)
    # This node's preference per direction; the planner picks the codec most members prefer and every node of
    # the round uses the plan's (docs/compression.md).
    activation_codec: str = setting("raw", f"codec for activations: {', '.join(CODEC_NAMES)}",
                                    _choice(*CODEC_NAMES))
    gradient_codec: str = setting("raw", f"codec for gradients: {', '.join(CODEC_NAMES)}", _choice(*CODEC_NAMES))


@dataclass(frozen=True)
class LinkConfig:
    """Measured links, and the link emulator test tool (node/control/links.py, node/dataplane/link_emulation.py)."""

    links_refresh_rounds: int = setting(3, "rounds between refreshes of this node's measured links", _positive_int)
    link_smoothing: float = setting(0.3, "weight of a new sample in a link's latency and bandwidth averages",
                                    _fraction)
    min_probe_bytes: int = setting(4096, "smallest send that counts as a bandwidth sample", _positive_int)
    max_pinged: int = setting(32, "peers a node measures links to each refresh, besides its next hops",
                              _positive_int)
    emulate_links: str = setting("", "TEST TOOL: delay and throttle sends as if nodes sat in the regions this "
                                     "JSON file gives their endpoints (node/dataplane/link_emulation.py); off when "
                                     "empty", _emulation_file, metavar="FILE")


@dataclass(frozen=True)
class FaultConfig:
    """Failure detection, reports, re-routing (node/faults/). One Ping, anywhere in the node, waits
    --probe-timeout."""

    hop_watch_interval: float = setting(0.5, "seconds between checks that the peers after our waiting hops are "
                                             "alive", _positive_float)
    probe_timeout: float = setting(1.0, "seconds a Ping may take before it counts as missed", _positive_float)
    hung_after_misses: int = setting(3, "missed pings in a row after which a peer is taken as hung",
                                     _positive_int)
    unreachable_patience: float = setting(1.0, "seconds a send keeps retrying a peer that refuses connections "
                                               "before the hop fails", _positive_float)
    relay_move_wait: float = setting(3.0, "seconds a call to a relayed peer that does not answer waits for the peer "
                                          "to announce another relay before it counts as gone", _positive_float)
    hop_deadline_slack: float = setting(4.0, "a hop fails when its gradient is not back after this many times "
                                             "the round's expected compute time", _positive_float)
    hop_deadline_min: float = setting(5.0, "the least seconds a hop may wait for its gradient", _positive_float)
    max_attempts: int = setting(3, "re-routes per microbatch before the origin gives it up", _positive_int)
    notice_timeout: float = setting(2.0, "seconds for a failure report or a re-route notice to be delivered",
                                    _positive_float)
    notice_tries: int = setting(3, "tries of a notice that timed out", _positive_int)
    notice_workers: int = setting(8, "re-route and round-done notices sent at once", _positive_int)
    report_workers: int = setting(2, "failure reports sent at once", _positive_int)
    ping_workers: int = setting(16, "liveness pings sent at once", _positive_int)
    skip_hop_checks: bool = setting(False, "MEASURING ONLY: do not check the hops peers send (bench/bench_poison.py "
                                           "times the checks' cost against this)", _bool, kind="switch")
    hop_check_band: float = setting(10.0, "an activation hop whose RMS is over this many times (or under 1/this) "
                                          "the running mean for its sender's stage is refused, and its sender "
                                          "reported to the origin (node/stage/hop_checks.py)",
                                    _within(_float, lambda x: x > 1, "must be a number above 1"))
    hop_check_warmup: int = setting(8, "hops per stage and direction a node accepts before it judges their size",
                                    _positive_int)
    hop_check_smoothing: float = setting(0.05, "the share of each accepted hop in the running mean of its size "
                                               "once warmed up", _fraction)
    hop_check_stale_rounds: int = setting(2, "rounds without a hop from a stage after which its band is learned "
                                             "again (a node left out of plans has not seen the weights move)",
                                          _positive_int)
    ban_rounds: int = setting(4, "rounds an origin keeps a reported peer out of its plans and paths, doubled at "
                                 "each further offence (node/faults/bans.py)", _positive_int)
    ban_after_refusals: int = setting(2, "refused hops of one peer, within --ban-window rounds, that make an "
                                         "offence (an honest hop can be an outlier once, docs/trust.md)",
                                      _positive_int)
    ban_window: int = setting(2, "rounds within which --ban-after-refusals refused hops count together",
                              _positive_int)
    misbehave: str = setting("none", "TEST TOOL (off by default): act as a hostile member would, to test the "
                                     "swarm's defences (node/faults/misbehave.py): "
                                     + ", ".join(MISBEHAVE_KINDS[1:]), _choice(*MISBEHAVE_KINDS))
    misbehave_from: int = setting(0, "TEST TOOL: the round from which --misbehave acts", _non_negative_int)

    def misbehaving(self, round_: int) -> str:
        """The --misbehave kind in force in `round_` ("none" before --misbehave-from)."""
        return self.misbehave if round_ >= self.misbehave_from else "none"


@dataclass(frozen=True)
class ExpertConfig:
    """HDEE domain experts in the swarm (node/expert/, docs/experts.md)."""

    domains: list[str] = setting([], "catalogue domain NAME=PATH set by the node that starts the swarm (repeat; "
                                     "default: the offline corpus)", _str_list, flag="domain", kind="repeat",
                                 metavar="NAME=PATH")
    dir: str = setting("", "directory of expert checkpoints (default: ~/.cache/swarm-node/experts)",
                       flag="expert_dir")
    policy: str = setting("ihe", "HDEE sizing: ihe (more steps for harder domains), mhe (wider MLPs) or "
                                 "homogeneous", _choice("ihe", "mhe", "homogeneous"), flag="expert_policy")
    steps: int = setting(0, "steps of a medium expert (0: 300); the policy scales them per domain",
                         _non_negative_int, flag="expert_steps")
    save_every: int = setting(50, "expert checkpoint (and publish) every N steps", _positive_int,
                              flag="expert_save_every")
    max_bytes: int = setting(400_000, "bytes of text kept per catalogue domain", _positive_int,
                             flag="expert_max_bytes")
    seed_dir: str = setting("", "expert checkpoint directory this (expert) node serves as the catalogue's seed",
                            flag="expert_seed")
    catalogue_owner: str = setting("", "peer id of the swarm's creator, whose signed catalogue this node trusts "
                                       "(default: the peer of the first --initial-peers address, or the owner "
                                       "that peer names)", _peer_id)
    # The owner signs the expiry too, so nobody else can extend it: this is how long the catalogue outlives its
    # owner. Long, so a swarm keeps training experts for a day without its creator.
    catalogue_ttl: float = setting(86400.0, "seconds the catalogue lives after its owner last signed it",
                                   _positive_float)
    claim_flops_limit: float = setting(1.0, "an expert counts, when nodes choose a domain, for at most this many "
                                            "times the FLOPs this node would plan for its domain; a larger claim "
                                            "is clamped and counted", _positive_float)
    claim_settle: float = setting(2.0, "seconds an expert claim waits for simultaneous claims to reach the DHT",
                                  _positive_float)
    retry_interval: float = setting(5.0, "least seconds between tries of an expert job that failed or found "
                                         "nothing to do", _positive_float)
    fetch_timeout: float = setting(300.0, "seconds one expert download (FetchExpert) may take", _positive_float)
    fetch_attempts: int = setting(3, "tries of an expert download that broke off (each resumes where the last "
                                     "stopped)", _positive_int)
    claim_tries: int = setting(3, "times a node chooses a domain again after another node claimed it first",
                               _positive_int)
    stop_timeout: float = setting(60.0, "seconds an expert job gets to reach its checkpoint when the node "
                                        "changes role or stops", _positive_float)
    default_steps = 300  # a medium expert's steps when --expert-steps is 0

    def medium_steps(self) -> int:
        return self.steps or self.default_steps


@dataclass(frozen=True)
class LifecycleConfig:
    """Start-up, shutdown and the waits they bound (docs/architecture.md, "A node"). Stop must finish within
    about 5 s: drain grace + child exits + DHT writes stay well below it."""

    drain_grace: float = setting(1.0, "seconds in-flight RPCs get to finish when the node stops",
                                 _non_negative_float)
    child_exit_timeout: float = setting(2.0, "seconds the DHT process gets to exit cleanly on shutdown before it "
                                             "is killed", _positive_float)
    state_transfer_timeout: float = setting(60.0, "seconds one FetchState (a stage's state from a replica) may "
                                                  "take before the next replica is tried", _positive_float)
    thread_join_timeout: float = setting(5.0, "seconds a stopping node waits for each of its threads",
                                         _positive_float)
    stuck_stop_dump: float = setting(4.0, "seconds after a stop signal after which a node still stopping writes "
                                          "every thread's stack to its log, to show what holds it", _positive_float)
    recheck_interval: float = setting(0.25, "seconds a bounded wait re-checks whether it was cancelled",
                                      _positive_float)
    events_file: str = setting("", "append one JSON line per event (round done, loss, weights digest)")
    log_level: str = setting("info", "debug, info, warning or error", _choice("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class NodeConfig:
    """Every setting of a node, by subsystem."""

    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    roles: RoleConfig = field(default_factory=RoleConfig)
    rounds: RoundConfig = field(default_factory=RoundConfig)
    dataplane: DataPlaneConfig = field(default_factory=DataPlaneConfig)
    links: LinkConfig = field(default_factory=LinkConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)

    @classmethod
    def of(cls, **values: Any) -> "NodeConfig":
        """A config from settings named as their flags (`probe_timeout=2`, `swarm="s"`); the rest default.
        Values are taken as given, not parsed: for code and tests that build a node directly."""
        sections: dict[str, dict[str, Any]] = {}
        for s in SETTINGS:
            if s.name in values:
                sections.setdefault(s.section, {})[s.field] = values.pop(s.name)
        if values:
            raise TypeError(f"not settings: {', '.join(sorted(values))}")
        return cls(**{f.name: f.type_(**sections.get(f.name, {})) for f in _SECTIONS})


# ---- the settings table, derived from the declarations above -------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    section: str  # NodeConfig's field
    field: str  # the section's field
    name: str  # the flag without dashes, the TOML key and the environment variable's suffix
    default: Any
    help: str
    parse: Callable[[Any], Any]
    kind: str
    metavar: str | None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class _Section:
    name: str
    type_: type


_SECTIONS = tuple(_Section(f.name, f.default_factory) for f in fields(NodeConfig))


def _settings() -> Iterator[Setting]:
    for section in _SECTIONS:
        for f in fields(section.type_):
            meta = f.metadata
            default = f.default_factory() if f.default is MISSING else f.default
            yield Setting(section.name, f.name, meta["flag"] or f.name, default, meta["help"], meta["parse"],
                          meta["kind"], meta["metavar"])


SETTINGS: tuple[Setting, ...] = tuple(_settings())
_BY_NAME = {s.name: s for s in SETTINGS}
assert len(_BY_NAME) == len(SETTINGS), "two settings share a flag"


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every setting. Defaults are left unset so that only flags given on the command line override."""
    parser.add_argument("--config", metavar="FILE", help="TOML file with node settings (flags and env override it)")
    for s in SETTINGS:
        if s.kind == "switch":
            parser.add_argument(s.flag, action="store_true", default=argparse.SUPPRESS, help=s.help)
        elif s.kind == "repeat":
            parser.add_argument(s.flag, nargs="+", action="extend", metavar=s.metavar, default=argparse.SUPPRESS,
                                help=s.help)
        elif s.kind == "list":
            parser.add_argument(s.flag, nargs="+", metavar=s.metavar, default=argparse.SUPPRESS, help=s.help)
        else:
            parser.add_argument(s.flag, metavar=s.metavar or s.name.upper(), default=argparse.SUPPRESS,
                                help=f"{s.help} (default: {s.default!r})")


def load_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> NodeConfig:
    """Merge defaults < TOML file < SWARM_NODE_* environment < flags, validating every value."""
    environ = os.environ if environ is None else environ
    values: dict[str, tuple[Any, str]] = {}
    config_path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        values.update(_read_toml(Path(config_path)))
    for key, raw in environ.items():
        if key.startswith(ENV_PREFIX) and key != ENV_PREFIX + "CONFIG":
            name = key[len(ENV_PREFIX):].lower()
            if name not in _BY_NAME:
                raise UsageError(f"environment variable {key} is not a setting; "
                                 f"see 'swarm-node run --help' for the settings")
            values[name] = (raw, f"environment variable {key}")
    for s in SETTINGS:
        if hasattr(args, s.name):
            values[s.name] = (getattr(args, s.name), s.flag)
    parsed = {}
    for name, (raw, source) in values.items():
        try:
            parsed[name] = _BY_NAME[name].parse(raw)
        except (TypeError, ValueError) as e:
            raise UsageError(f"{source} = {raw!r}: {e}") from None
    config = NodeConfig.of(**parsed)
    _check_consistency(config)
    return config


def _read_toml(path: Path) -> dict[str, tuple[Any, str]]:
    """Flat keys as the flags (`probe-timeout` or `probe_timeout`), or a table per section (`[faults]`)."""
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    sections = {s.name: s.type_ for s in _SECTIONS}
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if isinstance(value, dict) and name in sections:
            by_field = {s.field: s for s in SETTINGS if s.section == name}
            for inner, inner_value in value.items():
                s = by_field.get(inner.replace("-", "_"))
                if s is None:
                    raise UsageError(f"config file {path}: [{key}] has no setting {inner!r}; "
                                     f"see 'swarm-node run --help'")
                out[s.name] = (inner_value, f"{path}: [{key}] {inner}")
            continue
        if name not in _BY_NAME:
            raise UsageError(f"config file {path}: unknown setting {key!r}; see 'swarm-node run --help'")
        out[name] = (value, f"{path}: {key}")
    return out


def _check_consistency(config: NodeConfig) -> None:
    swarm, roles, rounds, experts = config.swarm, config.roles, config.rounds, config.experts
    num_stages = config.model.num_stages
    if swarm.new_swarm and swarm.initial_peers:
        raise UsageError("--new-swarm starts a swarm, --initial-peers joins one: give only one of them")
    if not swarm.new_swarm and not swarm.initial_peers:
        raise UsageError("give --initial-peers MADDR ... to join a swarm, or --new-swarm to start one")
    stages = roles.hosted_stages()
    if stages is not None and max(stages) >= num_stages:
        raise UsageError(f"--stages {roles.stages}: this swarm has stages 0..{num_stages - 1}")
    if rounds.visits and not (min(2, num_stages) <= rounds.visits <= num_stages):
        raise UsageError(f"--visits {rounds.visits}: give between 2 and --num-stages ({num_stages}), "
                         f"or 0 for full pipelines")
    if config.data.paths and config.data.dataset:
        raise UsageError("give either --data or --dataset, not both")
    for spec in experts.domains:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or "/" in name or name.startswith(("_", "*")):
            raise UsageError(f"--domain {spec!r}: expected NAME=PATH with a NAME without '/', '_' or '*' first")
        if not path.startswith("hf:") and not Path(path).is_file():
            raise UsageError(f"--domain {spec!r}: {path} does not exist")
    if swarm.new_swarm and experts.catalogue_owner:
        raise UsageError("--new-swarm makes this node the catalogue's owner: drop --catalogue-owner")
    if experts.seed_dir and not (Path(experts.seed_dir) / "manifest.json").is_file():
        raise UsageError(f"--expert-seed {experts.seed_dir}: not an expert checkpoint (no manifest.json)")
    if roles.role == "expert" and roles.stages != "auto":
        raise UsageError("--role expert hosts no stage; drop --stages")
    if rounds.max_inflight > rounds.memory_slots:
        raise UsageError(f"--max-inflight {rounds.max_inflight} exceeds --memory-slots {rounds.memory_slots}")
