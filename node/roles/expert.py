"""The expert role: train HDEE domain experts from the swarm's catalogue, publish them and serve their weights
(node/expert/), on the host's server, DHT, channels and metrics. Used when the pipeline has what it needs."""

from __future__ import annotations

import logging
import threading

import grpc

from node.config import NodeConfig
from node.expert.directory import ExpertDirectory
from node.expert.metrics import ExpertMetrics
from node.expert.owner import CatalogueOwner
from node.expert.service import ExpertServicer
from node.expert.worker import ExpertWorker
from node.host.host import Advertised, HostServices
from node.model import ModelSetup
from node.roles.choice import Relaunch, Role, stage_in_need
from protocol.records import NodeState
from protocol.service import expert_service_handler

log = logging.getLogger(__name__)


class ExpertRole:
    health_names = ("swarm.v1.ExpertService",)

    def __init__(self, config: NodeConfig, services: HostServices, model: ModelSetup):
        self.config = config
        self.services = services
        metrics = ExpertMetrics(services.metrics.registry)
        services.metrics.set_role("expert")
        owner = CatalogueOwner.for_node(config.experts.catalogue_owner, services.peer_id, config.swarm.new_swarm,
                                        config.swarm.initial_peers)
        self.directory = ExpertDirectory(services.dht, config.swarm.id, owner,
                                         on_malformed=lambda kind: metrics.malformed.labels(kind=kind).inc(),
                                         on_refused=lambda reason: metrics.refused.labels(reason=reason).inc(),
                                         owner=services.trust.owner)
        self.worker = ExpertWorker(config, services, model, metrics, self.directory)
        self.stage_needed: int | None = None  # set by the pipeline watch (--role auto)
        self._needed = threading.Event()
        self._watch: threading.Thread | None = None
        self.servicer = ExpertServicer(config.swarm.id, self.worker.served,
                                       on_data_loss=lambda r: self.directory.withdraw(r, ttl=config.swarm.record_ttl),
                                       on_bytes=metrics.bytes_served.inc)

    # ---- what the host serves and announces --------------------------------------------------------------------
    def register(self, server: grpc.Server) -> None:
        server.add_generic_rpc_handlers((expert_service_handler(self.servicer, self.services.metrics.count_frame),))

    def advertised(self) -> Advertised:
        return Advertised(role="expert", memory_slots=self.config.rounds.memory_slots)

    def on_beat(self) -> None:
        pass

    def interrupt(self) -> None:
        pass  # the job loop watches the stop event at every step

    def started(self) -> None:
        self.services.presence.set_state(NodeState.SERVING)
        self.worker.start()
        if self.config.roles.role == Role.AUTO:
            self._watch = threading.Thread(target=self._watch_pipeline, name="pipeline-watch", daemon=True)
            self._watch.start()

    # ---- running -----------------------------------------------------------------------------------------------
    def run(self) -> Relaunch | None:
        """Train until stopped; a role change when the pipeline needs this node (auto role)."""
        stop = self.services.stop
        while not stop.is_set():
            if self._needed.wait(self.config.lifecycle.recheck_interval):
                self.worker.finish_job()  # the job loop stops at its next step, at a checkpoint
                return Relaunch(Role.STAGE, self.stage_needed)
        return None

    def close(self) -> None:
        self.worker.join()
        self.worker.withdraw_all()
        if self._watch is not None:
            self._watch.join(self.config.lifecycle.thread_join_timeout)

    # ---- the pipeline comes first ------------------------------------------------------------------------------
    def _watch_pipeline(self) -> None:
        """Every heartbeat, count each stage's live replicas (records whose node answers a Ping); when one is short,
        halt the expert job at a checkpoint and have the node take that stage."""
        services, cfg = self.services, self.config
        while not services.stop.wait(cfg.swarm.heartbeat_interval):
            try:
                records = {p: r for p, r in services.directory.members().items() if r.stages}
                alive = services.clients.answering({p: r.endpoint for p, r in records.items()},
                                                   cfg.faults.probe_timeout, cfg.faults.ping_workers)
                need = stage_in_need({p: r for p, r in records.items() if p in alive}, cfg.model.num_stages,
                                     cfg.roles.min_replicas)
            except Exception as e:  # the DHT may be shutting down; the next beat retries
                log.debug("pipeline watch failed: %r", e)
                continue
            if need is not None:
                log.info("stage %d has fewer than %d live replicas: stopping expert training to take it", need,
                         cfg.roles.min_replicas)
                self.stage_needed = need
                self.worker.halt()
                self._needed.set()
                return
