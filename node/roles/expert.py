"""The expert role: train HDEE domain experts from the swarm's catalogue, publish them and serve their weights
(node/expert/), on the host's server, DHT, channels and metrics. Used when the pipeline has what it needs."""

from __future__ import annotations

import logging

import grpc

from node.config import NodeConfig
from node.expert.directory import ExpertDirectory
from node.expert.metrics import ExpertMetrics
from node.expert.service import ExpertServicer
from node.expert.worker import ExpertWorker
from node.host.host import Advertised, HostServices
from node.model import ModelSetup
from node.roles.choice import Relaunch, Role
from protocol.generated.swarm.v1 import experts_pb2_grpc
from protocol.records import NodeState

log = logging.getLogger(__name__)


class ExpertRole:
    health_names = ("swarm.v1.ExpertService",)

    def __init__(self, config: NodeConfig, services: HostServices, model: ModelSetup):
        self.config = config
        self.services = services
        metrics = ExpertMetrics(services.metrics.registry)
        services.metrics.set_role("expert")
        self.directory = ExpertDirectory(services.dht, config.swarm.id,
                                         lambda kind: metrics.malformed.labels(kind=kind).inc(),
                                         owner=services.trust.owner)
        self.worker = ExpertWorker(config, services, model, metrics, self.directory,
                                   watch_pipeline=config.roles.role == Role.AUTO)
        self.servicer = ExpertServicer(config.swarm.id, self.worker.served,
                                       on_data_loss=lambda r: self.directory.withdraw(r, ttl=config.swarm.record_ttl),
                                       on_bytes=metrics.bytes_served.inc)

    # ---- what the host serves and announces --------------------------------------------------------------------
    def register(self, server: grpc.Server) -> None:
        experts_pb2_grpc.add_ExpertServiceServicer_to_server(self.servicer, server)

    def advertised(self) -> Advertised:
        return Advertised(role="expert", memory_slots=self.config.rounds.memory_slots)

    def on_beat(self) -> None:
        pass

    def interrupt(self) -> None:
        pass  # the job loop watches the stop event at every step

    def started(self) -> None:
        self.services.presence.set_state(NodeState.SERVING)
        self.worker.start()

    # ---- running -----------------------------------------------------------------------------------------------
    def run(self) -> Relaunch | None:
        """Train until stopped; a role change when the pipeline needs this node (auto role)."""
        stop = self.services.stop
        while not stop.is_set():
            if self.worker.needed.wait(self.config.lifecycle.recheck_interval):
                self.worker.finish_job()  # the job loop stops at its next step, at a checkpoint
                return Relaunch(Role.STAGE, self.worker.stage_needed)
        return None

    def close(self) -> None:
        self.worker.join()
        self.worker.withdraw_all()
