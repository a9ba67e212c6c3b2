"""Prometheus metrics of the expert role, on the node's registry (node/host/metrics.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class ExpertMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.train_loss = Gauge("swarm_node_expert_train_loss", "Training loss of the expert's last step",
                                ["domain"], registry=r)
        self.steps = Counter("swarm_node_expert_steps", "Expert training steps taken by this node", registry=r)
        self.published = Counter("swarm_node_experts_published", "Expert records published (each checkpoint)",
                                 registry=r)
        self.bytes_served = Counter("swarm_node_expert_bytes_served", "Expert weight bytes streamed by FetchExpert",
                                    registry=r)
        self.malformed = Counter("swarm_node_expert_records_malformed",
                                 "Catalogue entries and expert records skipped as malformed", ["kind"], registry=r)
        self.refused = Counter("swarm_node_expert_records_refused",
                               "Catalogue entries, expert records, claims and downloaded copies refused or clamped "
                               "as forged, per read (not_owner, unowned, unsigned, id, seed, weights, not_member, "
                               "second_claim, claim_clamped)", ["reason"], registry=r)
