"""Prometheus metrics for one node, on its own registry (so tests can run several nodes in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.forwarded = Counter("swarm_node_microbatches_forwarded", "Forward passes computed", ["stage"], registry=r)
        self.backwarded = Counter("swarm_node_microbatches_backwarded", "Backward passes computed", ["stage"],
                                  registry=r)
        self.sent_bytes = Counter("swarm_node_sent_bytes", "Tensor bytes sent over the data plane", registry=r)
        self.received_bytes = Counter("swarm_node_received_bytes", "Tensor bytes received over the data plane",
                                      registry=r)
        self.rpc_seconds = Histogram("swarm_node_rpc_duration_seconds", "Data-plane RPC latency",
                                     ["method", "side"], buckets=_LATENCY_BUCKETS, registry=r)
        self.rpc_errors = Counter("swarm_node_rpc_errors", "RPCs answered or failed with an error status",
                                  ["method", "code"], registry=r)
        self.round_seconds = Histogram("swarm_node_round_duration_seconds", "Wall time of a training round",
                                       buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300), registry=r)
        self.round = Gauge("swarm_node_round", "The round this node works on", registry=r)
        self.loss = Gauge("swarm_node_loss", "Mean training loss of this data node's last round", registry=r)
        self.tokens = Counter("swarm_node_tokens", "Tokens trained on by this data node", registry=r)
        self.visible_peers = Gauge("swarm_node_visible_peers", "Live nodes of this swarm seen in the DHT", registry=r)
        self.heartbeat_age = Gauge("swarm_node_dht_heartbeat_age_seconds",
                                   "Seconds since this node's last successful DHT heartbeat", registry=r)
        self.activations_held = Gauge("swarm_node_activation_microbatches",
                                      "Microbatches whose activations this node holds", registry=r)
        self.averaging_failures = Counter("swarm_node_averaging_failures",
                                          "Rounds whose gradient averaging did not reach every replica", registry=r)

        # trust (issue 10): what this node refused from strangers and forgers
        self.auth_refused = Counter("swarm_node_auth_refused", "RPCs refused as UNAUTHENTICATED (private swarms)",
                                    ["method", "reason"], registry=r)
        self.records_dropped = Counter("swarm_node_records_dropped",
                                       "DHT records or plans this node read and ignored (unsigned, not the "
                                       "planner's, malformed)", ["reason"], registry=r)
        self.streams_refused = Counter("swarm_node_streams_refused", "Streams refused or cancelled to keep gRPC "
                                       "workers free (busy, per_peer, idle)", ["reason"], registry=r)

    def watch_dht_refusals(self, read) -> None:
        """Export the count of records the DHT process refused (bad signature or swarm-key MAC)."""
        class _Collector:
            def collect(self):
                family = CounterMetricFamily("swarm_node_dht_records_refused",
                                             "DHT records refused for a bad owner signature or swarm-key MAC")
                family.add_metric([], read())
                yield family
        self.registry.register(_Collector())

    def serve(self, host: str, port: int):
        """Start the /metrics HTTP server; returns (server, port)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return server, thread, server.server_port
