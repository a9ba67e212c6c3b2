"""The fault-handling parts of a node, built together: declared-dead peers, failure reports to origins,
re-route notices, the hop watch, the re-router and checkpoints (see node/faults/detection.py, node/faults/reroute.py,
node/control/checkpoint.py)."""

from __future__ import annotations

from dataclasses import dataclass

from node.control.checkpoint import StageCheckpoints
from node.config import NodeConfig
from node.stage.executor import StageExecutor
from node.faults.detection import DeadPeers, FailureReporter, HopWatch, RerouteNotifier
from node.host.metrics import NodeMetrics
from node.stage.origin import Origin, Recovery
from node.faults.reroute import Rerouter
from node.dataplane.transport import StageClients
from protocol.generated.swarm.v1 import stage_pb2 as pb


@dataclass
class Resilience:
    dead: DeadPeers
    reporter: FailureReporter
    notifier: RerouteNotifier
    watch: HopWatch
    rerouter: Rerouter
    checkpoints: StageCheckpoints | None
    origin: Origin | None = None

    @classmethod
    def create(cls, cfg: NodeConfig, peer_id: str, clients: StageClients, metrics: NodeMetrics,
               executor: StageExecutor, activation_bytes: int) -> "Resilience":
        dead = DeadPeers(metrics)
        reporter = FailureReporter(cfg.swarm, peer_id, clients, metrics, dead, local=lambda r: None,
                                   timeout_s=cfg.notice_timeout)
        watch = HopWatch(peer_id, executor, clients, reporter, dead, interval_s=cfg.hop_watch_interval,
                         probe_timeout_s=cfg.probe_timeout, hung_after_misses=cfg.hung_after_misses)
        built = cls(dead, reporter, RerouteNotifier(peer_id, clients, executor, cfg.notice_timeout), watch,
                    Rerouter(activation_bytes), StageCheckpoints(cfg.checkpoint_dir) if cfg.checkpoint_dir else None)
        reporter.local = built.on_failure_report  # reports about our own microbatches go to our origin
        dead.listeners.append(lambda peer: executor.origin_done(executor.round, peer))  # a dead origin is done
        return built

    def attach(self, origin: Origin, members, metrics: NodeMetrics, max_attempts: int) -> None:
        """Let `origin` re-route its failed microbatches, and receive the reports about them."""
        self.origin = origin
        origin.recovery = Recovery(self.dead, self.rerouter, members, self.notifier, metrics, max_attempts)

    def on_failure_report(self, report: pb.FailureReport) -> None:
        if self.origin is not None:
            self.origin.on_failure_report(report)

    def checkpoint_state(self, stage: int):
        """(round, tensors, metadata) of our newest checkpoint of `stage`, or None."""
        if self.checkpoints is None:
            return None
        saved = self.checkpoints.latest(stage)
        return None if saved is None else saved[:3]

    def close(self) -> None:
        self.watch.stop()
        self.reporter.close()
        self.notifier.close()
        if self.origin is not None:
            self.origin.close()
