"""The node daemon: `Daemon.create(config)` builds and starts a node, `run()` trains, `shutdown()` stops it.

A node is a host (node/host/host.py: identity, DHT, gRPC server, metrics, heartbeat, leaving) and one role
(node/roles/: pipeline stages, or domain experts) built from the host's services. The model's settings are
resolved first, so a bad --model or --device stops the node before it joins the DHT; the DHT is a forked
process, so the host starts it before anything creates a thread.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from node.config import NodeConfig
from node.events import EventLog
from node.host.host import NodeHost
from node.model import ModelSetup
from node.roles.choice import Relaunch, Role, choose_stages
from node.roles.expert import ExpertRole
from node.roles.stage import StageRole
from protocol.limits import WireLimits

log = logging.getLogger(__name__)


class Daemon:
    """One node: a host and the role it serves. `shutdown` undoes `create` in reverse order."""

    def __init__(self, config: NodeConfig, stop: threading.Event, limits: WireLimits):
        self.config = config
        self.stop = stop
        self.limits = limits
        self.events = EventLog(config.lifecycle.events_file)
        self.host: NodeHost | None = None
        self.role: StageRole | ExpertRole | None = None
        self.stages: list[int] = []  # empty in the expert role
        self.relaunch: Relaunch | None = None  # set when run() ends in a role change

    @classmethod
    def create(cls, config: NodeConfig, stop: threading.Event | None = None,
               limits: WireLimits = WireLimits()) -> "Daemon":
        """Build and start a node; if any step fails (or `stop` is set meanwhile), undo the ones done and raise."""
        node = cls(config, stop or threading.Event(), limits)
        try:
            node._build()
        except BaseException:
            node.shutdown()
            raise
        return node

    def _build(self) -> None:
        cfg = self.config
        self._check_stop()
        if cfg.model.torch_threads:
            torch.set_num_threads(cfg.model.torch_threads)
        model = ModelSetup.resolve(cfg)
        self.host = NodeHost.create(cfg, self.stop, self.limits, self.events)
        services = self.host.services
        self._check_stop()
        members = services.directory.members() if cfg.swarm.initial_peers and cfg.roles.role != Role.EXPERT else {}
        self.stages = choose_stages(cfg.roles.role, cfg.roles.hosted_stages(), members, cfg.model.num_stages,
                                    cfg.roles.min_replicas)
        if self.stages:
            self.role = StageRole.create(cfg, services, model, self.stages, self.limits)
        else:
            self.role = ExpertRole(cfg, services, model)
        self._check_stop()
        self.host.serve(self.role)
        self.events.emit("started", peer_id=self.peer_id, maddrs=list(self.maddrs), endpoint=self.endpoint,
                         metrics_url=self.metrics_url, stages=self.stages, role=self.role.advertised().role)

    def run(self) -> None:
        """Take part in the swarm until stopped, `--rounds` is reached, or the role should change."""
        self.relaunch = self.role.run()
        if self.relaunch is not None:
            self.events.emit("relaunch", role=self.relaunch.role.value, stage=self.relaunch.stage)

    def shutdown(self) -> None:
        """Withdraw from the swarm, stop the role, then the host's servers, channels and DHT."""
        self.stop.set()
        started = time.monotonic()
        steps: list[str] = []  # where a slow stop spent its time

        def timed(name: str, step) -> None:
            began = time.monotonic()
            step()
            steps.append(f"{name} {time.monotonic() - began:.1f} s")

        if self.host is not None:
            self.host.metrics.phase.state("stopping")
            timed("leaving and draining", self.host.stop_serving)
        if self.role is not None:
            timed("role", self.role.close)
        if self.host is not None:
            timed("DHT and channels", self.host.close)
            log.info("stopped in %.1f s (%s)", time.monotonic() - started, ", ".join(steps))
        self.events.emit("stopped", peer_id=self.peer_id, seconds=time.monotonic() - started)

    # ---- what the CLI prints -----------------------------------------------------------------------------------
    @property
    def peer_id(self) -> str | None:
        return self.host.peer_id if self.host is not None else None

    @property
    def maddrs(self) -> tuple[str, ...]:
        return self.host.maddrs

    @property
    def endpoint(self) -> str:
        return self.host.endpoint

    @property
    def metrics_url(self) -> str:
        return self.host.metrics_url

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Stopped()


class Stopped(Exception):
    """Stop was requested while the node was still being built."""
