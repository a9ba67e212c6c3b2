"""Prometheus metrics for one node, on its own registry (so tests can run several nodes in one process)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from protocol.records import NodeState
from protocol.service import KINDS, kind_of

# starting: building components; catch_up: copying a stage's state from a replica (joining, or a round it
# was left out of); planning: waiting for the round's plan; compute: the round's forward and backward hops;
# averaging: the replicas' barrier and all-reduce, then the step; stopping: shutting down.
PHASES = ("starting", "catch_up", "planning", "compute", "averaging", "stopping")
ROLES = ("data", "stage", "expert")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.forwarded = Counter("swarm_node_microbatches_forwarded", "Forward passes computed", ["stage"], registry=r)
        self.backwarded = Counter("swarm_node_microbatches_backwarded", "Backward passes computed", ["stage"],
                                  registry=r)
        # Counted from the gRPC messages this node's clients and server actually sent and received (protocol.service).
        self.sent_bytes = Counter("swarm_node_sent_bytes", "Bytes of gRPC messages sent, by kind of traffic",
                                  ["kind"], registry=r)
        self.received_bytes = Counter("swarm_node_received_bytes", "Bytes of gRPC messages received, by kind of traffic",
                                      ["kind"], registry=r)
        self._totals: collections.Counter[tuple[str, str]] = collections.Counter()  # (direction, kind) -> bytes: the same, readable
        self._totals_lock = threading.Lock()
        for kind in KINDS:  # every kind shows from the start, at 0
            self.sent_bytes.labels(kind=kind)
            self.received_bytes.labels(kind=kind)
        self.rpc_seconds = Histogram("swarm_node_rpc_duration_seconds", "Data-plane RPC latency",
                                     ["method", "side"], buckets=_LATENCY_BUCKETS, registry=r)
        self.rpc_errors = Counter("swarm_node_rpc_errors",
                                  "RPCs refused or failed, by this node (server) or its peers (client), with the status",
                                  ["method", "code"], registry=r)
        self.round_seconds = Histogram("swarm_node_round_duration_seconds", "Wall time of a training round",
                                       buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300), registry=r)
        self.round = Gauge("swarm_node_round", "The round this node works on", registry=r)
        # Only where a loss is computed (data nodes), and only after a round that trained on some tokens.
        self.loss = _OptionalGauge("swarm_node_loss", "Mean training loss of this data node's last round")
        r.register(self.loss)
        self.tokens = Counter("swarm_node_tokens", "Tokens trained on by this data node", registry=r)
        self.visible_peers = Gauge("swarm_node_visible_peers", "Live nodes of this swarm seen in the DHT", registry=r)
        self.heartbeat_age = Gauge("swarm_node_dht_heartbeat_age_seconds",
                                   "Seconds since the heartbeat time of this node's record as last read back "
                                   "from the DHT", registry=r)
        self.activations_held = Gauge("swarm_node_activation_microbatches",
                                      "Microbatches whose activations this node holds", registry=r)
        self.state = Enum("swarm_node_state", "Where this node is in its life (also in its DHT record)",
                          states=[s.value for s in NodeState], registry=r)
        self.role = Gauge("swarm_node_role", "1 for the role this node has now", ["role"], registry=r)
        self.phase = Enum("swarm_node_phase", "What the node's main loop is doing now", states=list(PHASES),
                          registry=r)
        self.rounds_completed = Counter("swarm_node_rounds_completed",
                                        "Rounds this node took part in and finished with all its planned work",
                                        registry=r)
        self.rounds_aborted = Counter("swarm_node_rounds_aborted",
                                      "Rounds this node took part in that timed out or were cut short by a stop",
                                      registry=r)
        self.sync_bytes = Gauge("swarm_node_sync_bytes", "Bytes a stage's last sync received from its replicas "
                                "(counted from the frames)", ["stage"], registry=r)
        self.sync_seconds = Gauge("swarm_node_sync_seconds", "Seconds a stage's last sync took", ["stage"],
                                  registry=r)
        self.last_sync_round = Gauge("swarm_node_last_sync_round", "The round whose sync a stage last applied "
                                     "(under outer; every round otherwise)", ["stage"], registry=r)
        self.replica_drift = Gauge("swarm_node_replica_drift", "Under outer: ||weights - anchor|| / ||anchor|| of a "
                                   "stage when its last sync began (0 otherwise)", ["stage"], registry=r)
        self.sync_strategy = Gauge("swarm_node_sync_strategy", "1 for the sync strategy of the last round's plan",
                                   ["strategy"], registry=r)
        self.sync_refused = Counter("swarm_node_sync_refused", "Replicas' gradients or pseudo-gradients left out of "
                                    "a sync: unreadable, mismatch, non_finite, or outlier (norm per "
                                    "microbatch over --outlier-ratio x the group's median)",
                                    ["reason"], registry=r)
        self.averaging_failures = Counter("swarm_node_averaging_failures",
                                          "Rounds whose gradient averaging did not reach every replica", registry=r)
        # Faults: detection, re-routing, checkpoints and lost stages (node/faults/detection.py, node/stage/origin.py,
        # node/control/checkpoint.py, node/control/restore.py).
        self.reroutes = Counter("swarm_node_reroutes", "Microbatches this origin re-routed after a failed hop",
                                registry=r)
        self.failed_hops = Counter("swarm_node_failed_hops",
                                   "Hops this node saw fail: unreachable, hung, deadline or refused", ["reason"],
                                   registry=r)
        self.hops_refused = Counter("swarm_node_hops_refused", "Hops from peers this node refused as implausible "
                                    "and reported to their origin: non_finite, or size (RMS outside "
                                    "--hop-check-band of what the sender's stage sends)", ["reason"], registry=r)
        self.hop_size_ratio = Histogram("swarm_node_hop_size_ratio", "How far each checked hop's RMS was from its "
                                        "band's mean, as a factor of at least 1 (refused above --hop-check-band): "
                                        "the headroom honest traffic leaves", ["direction"],
                                        buckets=(1.25, 1.5, 2, 3, 5, 10, 20, 50, 100, 1000), registry=r)
        self.hops_acknowledged = Counter("swarm_node_hops_acknowledged", "Hops this node sent that their receiver "
                                         "took, by its receipt", ["direction"], registry=r)
        self.tokens_acknowledged = Counter("swarm_node_tokens_acknowledged", "Tokens of those hops, as the "
                                           "receivers' receipts count them", ["direction"], registry=r)
        self.receipts_refused = Counter("swarm_node_receipts_refused", "Receipts for hops this node sent that "
                                        "acknowledged other tokens than the hop carried (not counted)", registry=r)
        self.accusations = Counter("swarm_node_accusations", "Reports of a peer's implausible hop this origin "
                                   "accepted (each counts towards a ban)", registry=r)
        self.banned_peers = Gauge("swarm_node_banned_peers", "Peers this node keeps out of its plans and paths "
                                  "now (--ban-rounds)", registry=r)
        self.peers_declared_dead = Counter("swarm_node_peers_declared_dead",
                                           "Peers this node declared dead (unreachable or hung)", registry=r)
        self.checkpoint_seconds = Histogram("swarm_node_checkpoint_seconds",
                                            "Time to write one stage's checkpoint to --checkpoint-dir",
                                            buckets=_LATENCY_BUCKETS, registry=r)
        self.missing_stages = Gauge("swarm_node_missing_stages",
                                    "Stages with no live replica in the planner's last look (the planner exports it)",
                                    registry=r)
        self.stage_recoveries = Counter("swarm_node_stage_recoveries",
                                        "Stages this node started from something other than its seed: "
                                        "checkpoint, replica, peer_checkpoint or checkfree", ["source"], registry=r)

        # trust (issue 10): what this node refused from strangers and forgers
        self.auth_refused = Counter("swarm_node_auth_refused", "RPCs refused as UNAUTHENTICATED (private swarms)",
                                    ["method", "reason"], registry=r)
        self.records_dropped = Counter("swarm_node_records_dropped",
                                       "DHT records or plans this node read and ignored (unsigned, not the "
                                       "planner's, malformed)", ["reason"], registry=r)
        self.streams_refused = Counter("swarm_node_streams_refused", "Streams refused or cancelled to keep gRPC "
                                       "workers free (busy, per_peer, idle)", ["reason"], registry=r)

        # relays (issue 17): what this node carries for members behind NAT
        self.relayed_bytes = Counter("swarm_node_relayed_bytes", "Bytes this node relayed for members behind NAT, "
                                     "both ways", registry=r)
        self.relay_attached = Gauge("swarm_node_relay_attached", "Members behind NAT attached to this node's relay",
                                    registry=r)
        self.relay_refused = Counter("swarm_node_relay_refused", "Attaches and relayed connections this node "
                                     "refused (not_relay, unreachable, full, swarm, connections, token, expired)", ["reason"],
                                     registry=r)

    def watch_dht_refusals(self, read) -> None:
        """Export the count of records the DHT process refused (bad signature or swarm-key MAC)."""
        class _Collector:
            def collect(self):
                family = CounterMetricFamily("swarm_node_dht_records_refused",
                                             "DHT records refused for a bad owner signature or swarm-key MAC")
                family.add_metric([], read())
                yield family
        self.registry.register(_Collector())

    def count_frame(self, direction: str, method: str, nbytes: int) -> None:
        """The `protocol.service.FrameMeter` of this node's stubs and handlers."""
        kind = kind_of(method)
        counter = self.sent_bytes if direction == "sent" else self.received_bytes
        counter.labels(kind=kind).inc(nbytes)
        with self._totals_lock:
            self._totals[direction, kind] += nbytes

    def bytes_so_far(self, direction: str, kind: str) -> int:
        """Bytes of `kind` sent or received since the node started: read it before and after a phase."""
        with self._totals_lock:
            return self._totals[direction, kind]

    def set_role(self, role: str) -> None:
        for name in ROLES:
            self.role.labels(role=name).set(1 if name == role else 0)

    def set_loss(self, loss: float | None) -> None:
        """The last round's loss; None withdraws the series (a round that trained on no tokens has none)."""
        self.loss.value = loss

    def track_heartbeat_age(self, age: Callable[[], float]) -> None:
        """Computed at scrape time, so a heartbeat thread stuck on a hung DHT cannot freeze the value."""
        self.heartbeat_age.set_function(age)

    def serve(self, host: str, port: int):
        """Start the /metrics HTTP server; returns (server, port)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return server, thread, server.server_port


class _OptionalGauge(Collector):
    """A gauge with no sample until it has a value (a plain Gauge would read 0 where nothing is measured)."""

    def __init__(self, name: str, documentation: str):
        self.name = name
        self.documentation = documentation
        self.value: float | None = None

    def describe(self):
        return [GaugeMetricFamily(self.name, self.documentation)]

    def collect(self):
        value = self.value
        if value is not None:
            yield GaugeMetricFamily(self.name, self.documentation, value=value)
