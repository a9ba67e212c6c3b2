"""The stage role: host pipeline stages and take part in rounds; on stage 0, also feed the data.

Built from the host's services in dependency order, each part handed the ones before it:
trainers → origin book → executor → origin → faults → sender → links → round loop → servicer.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from contextlib import ExitStack

import grpc
import torch

from lm.build import build_stage
from lm.data import load_corpus
from lm.stage import PipelineStage
from lm.whole import save_stage_shard
from node.config import NodeConfig
from node.sync.averaging import GradientExchange
from node.sync.outer_sync import OuterSync, weights_epoch
from node.control.checkpoint import StageCheckpoints
from node.control.links import LinkBook, LinkMeter, ping_with
from node.control.restore import restore_stages
from node.control.rounds import RoundLoop
from node.dataplane.servicer import StageServicer
from node.dataplane.transport import HopSender
from node.expert.directory import ExpertDirectory
from node.expert.owner import CatalogueOwner
from node.expert.worker import CatalogueKeeper
from node.faults import misbehave
from node.faults.faults import Faults
from node.host.host import Advertised, HostServices
from node.host.reachability import dial_back
from node.model import ModelSetup, usage
from node.roles.choice import Relaunch, Role
from node.stage.admission import HopAdmission
from node.stage.compute import OriginHooks
from node.stage.executor import StageExecutor
from node.stage.hop_checks import HopChecks
from node.stage.witness import Witness
from node.stage.origin import Origin, OriginBook
from node.stage.trainer import StageTrainer
from protocol.codec_names import CODEC_NAMES
from protocol.limits import WireLimits
from protocol.records import NodeState
from protocol.service import SERVICE, SYNC, stage_service_handler

log = logging.getLogger(__name__)


class StageRole:
    health_names = (SERVICE,)

    def __init__(self, config: NodeConfig, services: HostServices, model: ModelSetup, stages: list[int],
                 limits: WireLimits):
        self.config = config
        self.services = services
        self.model = model
        self.stages = stages
        self.limits = limits
        self._first_round: int | None = None  # known once the node has joined
        self._teardown = ExitStack()

    @classmethod
    def create(cls, config: NodeConfig, services: HostServices, model: ModelSetup, stages: list[int],
               limits: WireLimits) -> "StageRole":
        role = cls(config, services, model, stages, limits)
        try:
            role._build()
        except BaseException:
            role.close()
            raise
        return role

    def _build(self) -> None:
        cfg, host, model, undo = self.config, self.services, self.model, self._teardown
        peer_id, metrics, swarm = host.peer_id, host.metrics, cfg.swarm.id
        lifecycle, rounds, data = cfg.lifecycle, cfg.rounds, cfg.data
        metrics.set_role("data" if 0 in self.stages else "stage")
        modules = {s: usage(build_stage, model.spec, s, cfg.model.num_stages, cfg.model.seed, model.device,
                            model.dtype)
                   for s in self.stages}
        self.trainers = {s: StageTrainer(m, cfg.training, recheck_s=lifecycle.recheck_interval)
                         for s, m in modules.items()}
        for trainer in self.trainers.values():
            undo.callback(trainer.close)
        self.checkpoints = StageCheckpoints(cfg.training.checkpoint_dir) if cfg.training.checkpoint_dir else None
        self._measured_s = self._measure_compute(modules)
        activation_bytes = model.activation_bytes(data)
        book = OriginBook(data.batch_size * data.seq_len) if 0 in self.stages else None
        self.executor = StageExecutor(peer_id, modules, model.device, model.dtype, rounds.memory_slots, metrics,
                                      send=self._send, hooks=book or OriginHooks(),
                                      recheck_s=lifecycle.recheck_interval, compute_smoothing=rounds.compute_smoothing,
                                      join_timeout=lifecycle.thread_join_timeout)
        self.executor.start()
        undo.callback(self.executor.stop)
        self.origin = None
        if book is not None:
            corpus = usage(load_corpus, data.paths, data.dataset or None, model.tokenizer)
            self.origin = Origin(swarm, self.executor, book, corpus, data.batch_size, data.seq_len,
                                 rounds.max_inflight, cfg.model.seed, memory_retry_s=rounds.memory_retry)
        self.faults = Faults(cfg.faults, swarm, peer_id, host.clients, host.trust.signer, metrics, self.executor,
                             activation_bytes, host.directory.members, lifecycle.thread_join_timeout,
                             host.events.emit, book=book,
                             restart=self.origin.start if self.origin else None)
        undo.callback(self.faults.close)
        self.faults.start()
        self.exchange = GradientExchange(swarm, peer_id, host.clients, self.limits.chunk_bytes,
                                         recheck_s=lifecycle.recheck_interval,
                                         refused=lambda reason: metrics.sync_refused.labels(reason=reason).inc(),
                                         outlier_ratio=cfg.sync.outlier_ratio)
        self.outer = OuterSync(self.exchange, cfg.sync, lambda: metrics.bytes_so_far("received", SYNC),
                               recheck_s=lifecycle.recheck_interval)
        undo.callback(self.outer.close)
        meter = LinkMeter(peer_id, cfg.links)
        self.sender = HopSender(peer_id, host.clients, metrics, local=self._accept_local,
                                on_give_up=self.faults.send_failed, deadline_s=rounds.round_timeout,
                                unreachable_patience_s=cfg.faults.unreachable_patience,
                                move_wait_s=cfg.faults.relay_move_wait,
                                workers=cfg.dataplane.send_workers, recheck_s=lifecycle.recheck_interval,
                                retry_s=(cfg.dataplane.send_retry_first, cfg.dataplane.send_retry_max),
                                on_sent=meter.observe_send)
        undo.callback(self.sender.close)
        links = LinkBook(host.dht, swarm, meter, ping_with(host.clients, cfg.faults.probe_timeout),
                         ttl=rounds.plan_ttl(), owner=host.trust.owner, max_pinged=cfg.links.max_pinged,
                         read_timeout=cfg.swarm.dht_read_timeout, traffic=host.clients.traffic.snapshot)
        roles = cfg.roles
        left_out_limit = roles.idle_rounds if roles.role == Role.AUTO and roles.hosted_stages() is None else None
        admission = HopAdmission(host.directory, cfg.dataplane)
        self.rounds = RoundLoop(cfg, peer_id, host.directory, self.executor, self.trainers, self.exchange, self.outer,
                                self.origin,
                                host.clients, metrics, host.events, self.faults, links, self.checkpoints,
                                activation_shape=model.activation_shape(data), activation_bytes=activation_bytes,
                                gradient_bytes=model.gradient_bytes(cfg.model.num_stages), on_plan=admission.know,
                                left_out_limit=left_out_limit, reachability=lambda: host.presence.reachability)
        # A tensor never exceeds twice this swarm's activation size: larger ones are refused from their header.
        limits = dataclasses.replace(self.limits, max_tensor_bytes=min(self.limits.max_tensor_bytes,
                                                                       2 * activation_bytes))
        self.witness = Witness()  # the work peers did for this node, for its record
        self.servicer = StageServicer(
            swarm=swarm, peer_id=peer_id, num_stages=cfg.model.num_stages, executor=self.executor,
            trainers=self.trainers, limits=limits, metrics=metrics, state_wait_s=lifecycle.state_transfer_timeout,
            exchange=self.exchange, on_failure_report=self.faults.on_failure_report if self.origin else None,
            checkpoint_state=self.checkpoints.state if self.checkpoints else None, auth=host.trust.auth,
            admission=admission, guard=host.guard,
            dial_back=lambda request, caller: dial_back(request, caller, host.clients, cfg.faults.probe_timeout),
            hop_checks=None if cfg.faults.skip_hop_checks else HopChecks(
                cfg.faults.hop_check_band, cfg.faults.hop_check_warmup, cfg.faults.hop_check_smoothing,
                cfg.faults.hop_check_stale_rounds,
                observe=lambda direction, ratio: metrics.hop_size_ratio.labels(direction=direction).observe(ratio),
                epoch=lambda round_: weights_epoch(admission.known(round_), round_)),
            on_hop_refused=self.faults.hop_refused, witness=self.witness)
        self.catalogue = None
        if cfg.swarm.new_swarm:  # whoever starts the swarm sets the experts' domain catalogue
            directory = ExpertDirectory(host.dht, swarm, CatalogueOwner(named=host.peer_id), owner=host.trust.owner)
            self.catalogue = CatalogueKeeper(directory, cfg.experts, model.tokenizer, creator=True)

    # ---- what the host serves and announces --------------------------------------------------------------------
    def register(self, server: grpc.Server) -> None:
        server.add_generic_rpc_handlers((stage_service_handler(self.servicer, self.services.metrics.count_frame),))

    def advertised(self) -> Advertised:
        cfg = self.config
        # An origin keeps at most max_inflight microbatches of its own: planners may route no more through it.
        slots = min(cfg.rounds.memory_slots, cfg.rounds.max_inflight) if 0 in self.stages else cfg.rounds.memory_slots
        return Advertised(role="data" if 0 in self.stages else "stage", stages=tuple(self.stages),
                          compute_s=self.executor.compute_seconds() or self._measured_s, memory_slots=slots,
                          round=max(self.executor.round, 0), num_stages=cfg.model.num_stages,
                          codecs=(cfg.dataplane.activation_codec, cfg.dataplane.gradient_codec), speaks=CODEC_NAMES,
                          sync=cfg.sync.strategy, sync_every=cfg.sync.every,
                          sync_state={stage: dict(round=x.last_round, bytes=x.bytes, seconds=x.seconds, drift=x.drift)
                                      for stage, x in self.rounds.sync_state().items()},
                          bans={p: b.to_value() for p, b in self.faults.bans.on_record().items()
                                if b.until_round > self.executor.round},
                          witnessed=self.witness.snapshot())

    def on_beat(self) -> None:
        self._serve_when_ready()

    def interrupt(self) -> None:
        """The node is stopping: end the waits that do not watch the stop event themselves."""
        for trainer in self.trainers.values():
            trainer.close()  # ends FetchState handlers waiting for a round
        if self.origin is not None:
            self.origin.interrupt()

    def started(self) -> None:
        """The host serves us now: keep the experts' catalogue (the node that started the swarm)."""
        if self.catalogue is not None:
            self._start_thread("catalogue", self._keep_catalogue)

    def _start_thread(self, name: str, target) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._teardown.callback(thread.join, self.config.lifecycle.thread_join_timeout)

    def _keep_catalogue(self) -> None:
        """Sign the catalogue again once per --record-ttl; it lives --catalogue-ttl after the last time."""
        while True:
            try:
                self.catalogue.refresh()
            except Exception as e:  # the DHT may be shutting down; the next refresh retries
                log.debug("catalogue refresh failed: %r", e)
            if self.services.stop.wait(self.config.swarm.record_ttl):
                return

    # ---- running -----------------------------------------------------------------------------------------------
    def join(self) -> int | None:
        """Restore each stage (checkpoint, replica or rebuild), then serve; returns the first round to take part
        in (None if stopped meanwhile)."""
        cfg, host = self.config, self.services
        host.metrics.phase.state("catch_up")
        first_round = restore_stages(self.trainers, host.directory.members() if cfg.swarm.initial_peers else {},
                                     host.peer_id, cfg.swarm.id, cfg.model.num_stages, host.clients,
                                     self.checkpoints, host.metrics, host.events.emit, host.stop,
                                     cfg.lifecycle.state_transfer_timeout)
        if host.stop.is_set():
            return None
        self.executor.resume_at(first_round)
        self._first_round = first_round
        self._serve_when_ready()  # now, or from the heartbeat once the loop has begun `first_round`
        return first_round

    def run(self) -> Relaunch | None:
        """Join, then take part in rounds until stopped or --rounds is reached; a role change when an auto node
        was left out of --idle-rounds plans in a row."""
        cfg, stop = self.config, self.services.stop
        first_round = self.join()
        if first_round is None:
            return None
        if self.rounds.run(first_round, stop):
            log.info("switching to experts")
            return Relaunch(Role.AUTO)
        self.sender.wait_idle(cfg.rounds.round_timeout, stop)  # the last round's gradients reach their hops
        if cfg.training.save_model and not stop.is_set():  # every stage's replicas hold the same weights now
            for module in self.executor.stages.values():
                save_stage_shard(module, self.model.spec.config, cfg.model.num_stages, cfg.training.save_model)
        return None

    def close(self) -> None:
        self._teardown.close()

    # ---- inside ------------------------------------------------------------------------------------------------
    def _serve_when_ready(self) -> None:
        """Become `serving` (plannable) once this node has begun its first round, or when nobody has planned
        that round yet: a plan that includes us is then at most one round ahead, which the executor parks.
        Not before the first reachability check has answered, so that planners do not plan us on a guess."""
        presence, directory = self.services.presence, self.services.directory
        if presence.state is not NodeState.JOINING or self._first_round is None or not presence.reach_known.is_set():
            return
        if self.executor.round >= self._first_round or directory.fetch_plan(self._first_round) is None:
            presence.set_state(NodeState.SERVING)
            self.services.events.emit("serving", peer_id=self.services.peer_id, first_round=self._first_round,
                                      compute_probe_s=self._measured_s)

    def _measure_compute(self, modules: dict[int, PipelineStage]) -> dict[int, float]:
        """Seconds per microbatch forward on this host, per stage: what planners weigh replicas by."""
        hidden = torch.zeros(*self.model.activation_shape(self.config.data), device=self.model.device,
                             dtype=self.model.dtype)
        out = {}
        with torch.no_grad():
            for s, m in modules.items():
                m(hidden)  # the first call warms up kernels and allocators
                started = time.perf_counter()
                m(hidden)
                out[s] = time.perf_counter() - started
        return out

    def _send(self, kind: str, env, tensor) -> None:
        tensor = misbehave.sent(self.config.faults.misbehaving(env.round), kind, tensor)  # a test tool; else as is
        self.sender(kind, env, tensor)  # built after the executor, which it delivers into

    def _accept_local(self, kind: str, env, tensor) -> None:
        (self.executor.accept_forward if kind == "forward" else self.executor.accept_backward)(env, tensor)
