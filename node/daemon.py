"""The node daemon: `Daemon.create(config)` builds and starts a node, `run()` trains, `shutdown()` stops it.

Start-up order matters: the DHT is a forked process, so it starts
before this process creates any thread (gRPC, compute, heartbeat).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from lm.build import build_stage, resolve_device, resolve_dtype
from lm.data import load_corpus
from lm.presets import ModelSpec, resolve_model, stage_layers
from lm.stage import PipelineStage
from lm.tokenizer import load_tokenizer
from lm.whole import save_stage_shard
from node.control.averaging import GradientExchange
from node.control.checkpoint import StageCheckpoints
from node.process.children import die_with_parent
from node.config import NodeConfig
from node.control.discovery import SwarmDirectory
from node.errors import UsageError
from node.events import EventLog
from node.stage.executor import StageExecutor
from node.expert.metrics import ExpertMetrics
from node.expert.worker import ExpertRole, keep_catalogue
from node.dataplane.link_emulation import LinkEmulator
from node.control.links import LinkBook, LinkMeter, LinkSettings, ping_with
from node.host.metrics import NodeMetrics
from node.stage.origin import Origin
from node.control.restore import recover_stages
from node.resilience import Resilience
from node.roles import Role, choose_stages, relaunch_args
from node.control.rounds import Faults, RoundLoop, RoundSettings
from node.host.rpc_guard import RpcGuard
from node.dataplane.servicer import VERSION, StageServicer
from node.stage.trainer import StageTrainer
from node.dataplane.transport import HopSender, StageClients
from node.stage.admission import HopAdmission
from node.host.reachability import dial_back, self_check
from node.host.stream_guard import StreamGuard, StreamLimits
from node.host.trust import NodeTrust
from protocol.codec_names import CODEC_NAMES
from protocol.grpc_options import server_options
from protocol.limits import WireLimits
from protocol.service import stage_service_handler
from protocol.records import NodeRecord, NodeState

log = logging.getLogger(__name__)


class Daemon:
    """One node. `create` builds and starts every component, `run` takes part in rounds until stopped, and
    `shutdown` undoes `create` in reverse order: each component registers its own teardown as it starts."""

    def __init__(self, config: NodeConfig, stop: threading.Event, limits: WireLimits):
        self.config = config
        self.stop = stop
        self.limits = limits
        self.metrics = NodeMetrics()
        self.expert_metrics = ExpertMetrics(self.metrics.registry)
        self.expert_role: ExpertRole | None = None  # the expert role instead of stages (node/expert/worker.py)
        self.relaunch: list[str] | None = None  # flags to restart with in another role (node/roles.py)
        self.events = EventLog(config.events_file)
        self.state = NodeState.JOINING
        self._first_round: int | None = None  # known once the node has joined
        self._teardown = ExitStack()

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

    def run(self) -> None:
        """Join the swarm, then take part in rounds until stopped or `--rounds` is reached."""
        if self.expert_role is not None:
            stage = self.expert_role.run(self.stop)
            if stage is not None:  # the pipeline comes first: restart as that stage's replica
                self.relaunch = relaunch_args(Role.STAGE, str(stage))
                self.events.emit("relaunch", role="stage", stage=stage)
            return
        first_round = self.join()
        if first_round is None:
            return
        self.rounds.run(first_round, self.stop)
        self.sender.wait_idle(self.config.round_timeout, self.stop)  # the last round's gradients reach their hops
        if self.config.save_model and not self.stop.is_set():  # every stage's replicas hold the same weights now
            for stage, module in self.executor.stages.items():
                save_stage_shard(module, self.spec.config, self.config.num_stages, self.config.save_model)

    def join(self) -> int | None:
        """Copy each stage's state from a replica if the swarm is running, then serve; returns the first round
        to take part in (None if stopped meanwhile)."""
        self.metrics.phase.state("catch_up")
        first_round = self._copy_swarm_state()
        if self.stop.is_set():
            return None
        self.executor.resume_at(first_round)
        self._first_round = first_round
        self._serve_when_ready()  # now, or from the heartbeat once the loop has begun `first_round`
        return first_round

    def shutdown(self) -> None:
        """Stop taking work, withdraw from the DHT, and stop every thread and child process started."""
        self.stop.set()
        self.metrics.phase.state("stopping")
        started = time.monotonic()
        self._teardown.close()
        if hasattr(self, "peer_id"):  # a node that never joined (a usage error) has nothing to report
            log.info("stopped in %.1f s", time.monotonic() - started)
        self.events.emit("stopped", peer_id=getattr(self, "peer_id", None), seconds=time.monotonic() - started)

    # ---- building -------------------------------------------------------------------------------------------
    def _build(self) -> None:
        cfg, undo = self.config, self._teardown
        self._check_stop()
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.device = _usage(resolve_device, cfg.device)
        self.dtype = _usage(resolve_dtype, cfg.dtype, self.device)
        self.tokenizer = _usage(load_tokenizer, cfg.tokenizer or None)
        self.spec: ModelSpec = _usage(resolve_model, cfg.model, self.tokenizer.vocab_size)
        if self.spec.config.vocab_size < self.tokenizer.vocab_size:
            raise UsageError(f"--model {cfg.model} has a vocabulary of {self.spec.config.vocab_size}, smaller than "
                             f"the tokenizer's {self.tokenizer.vocab_size}; give the matching --tokenizer")
        _usage(stage_layers, self.spec.config.num_hidden_layers, cfg.num_stages)
        _check_port_free(cfg.host, cfg.port, "gRPC", "--port")  # before the DHT starts: a taken port fails at once
        _check_port_free(cfg.host, cfg.metrics_port, "metrics", "--metrics-port")

        self.trust = NodeTrust.create(cfg.identity_path, cfg.swarm_key, cfg.tls, cfg.tls_cert, cfg.tls_key)
        undo.callback(self.trust.close)
        # Forked processes first, before this process has threads; each dies with us (node/process/children.py).
        die_with_parent()
        self.dht = self._start_dht()
        undo.callback(self.dht.shutdown)
        self.peer_id = self.dht.peer_id.to_base58()
        self.maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
        self.metrics.watch_dht_refusals(lambda: self.trust.refused_records.value)
        self.directory = SwarmDirectory(self.dht, cfg.swarm, self.peer_id, ttl=cfg.record_ttl, owner=self.trust.owner,
                                        on_dropped=lambda reason: self.metrics.records_dropped.labels(reason).inc(),
                                        read_timeout=cfg.dht_read_timeout, stop=self.stop)
        self.stages = self._choose_stages()
        if not self.stages:  # the expert role: no pipeline at all
            self.expert_role = ExpertRole(self)
            undo.callback(self.expert_role.shutdown)
            self.expert_role.start()
            self.endpoint, self.metrics_url = self.expert_role.endpoint, self.expert_role.metrics_url
            self.events.emit("started", peer_id=self.peer_id, maddrs=self.maddrs, endpoint=self.endpoint,
                             metrics_url=self.metrics_url, stages=[], role="expert")
            return
        self.expert_metrics.set_role("data" if 0 in self.stages else "stage")
        self._check_stop()

        modules = {s: _usage(build_stage, self.spec, s, cfg.num_stages, cfg.seed, self.device, self.dtype)
                   for s in self.stages}
        self.trainers = {s: StageTrainer(m, cfg.lr, cfg.weight_decay, cfg.grad_clip, cfg.warmup_rounds)
                         for s, m in modules.items()}
        for trainer in self.trainers.values():
            undo.callback(trainer.close)
        self._compute_s = self._measure_compute(modules)
        self.clients = StageClients(self.limits, self.trust.auth, self.trust.tls)
        undo.callback(self.clients.close)
        self.executor = StageExecutor(self.peer_id, modules, self.device, self.dtype, cfg.memory_slots,
                                      self.metrics, send=self._send)
        self.executor.start()
        undo.callback(self.executor.stop)
        self.activation_bytes = cfg.batch_size * cfg.seq_len * self.spec.config.hidden_size * self.dtype.itemsize
        self.exchange = GradientExchange(cfg.swarm, self.peer_id, self.clients, self.limits.chunk_bytes)
        self.resilience = Resilience.create(cfg, self.peer_id, self.clients, self.metrics, self.executor,
                                            self.activation_bytes)
        undo.callback(self.resilience.close)
        self.emulator = LinkEmulator.load(cfg.emulate_links) if cfg.emulate_links else None  # a test tool
        self.link_meter = LinkMeter(self.peer_id, LinkSettings(refresh_rounds=cfg.links_refresh_rounds))
        self.sender = HopSender(self.peer_id, self.clients, self.metrics, local=self._accept_local,
                                on_give_up=self.resilience.reporter.send_failed, deadline_s=cfg.round_timeout,
                                unreachable_patience_s=cfg.unreachable_patience, workers=cfg.send_workers,
                                emulator=self.emulator, on_sent=self.link_meter.observe_send)
        undo.callback(self.sender.close)
        self.origin = self._make_origin()
        if self.origin is not None:
            self.resilience.attach(self.origin, self.directory.members, self.metrics, cfg.max_attempts)
        self.resilience.watch.start()
        self.rounds = self._make_round_loop()
        if cfg.role == Role.AUTO and cfg.hosted_stages() is None:
            self.rounds.on_left_out = self._left_out
        self._check_stop()

        self._start_grpc()
        self._start_metrics()
        self._start_thread("heartbeat", self._heartbeat_loop)
        self._start_thread("interrupter", self._interrupt_waits_on_stop)
        undo.callback(self._leave)
        self._announce()
        if cfg.new_swarm:  # whoever starts the swarm sets the experts' domain catalogue
            keep_catalogue(self)
        self.events.emit("started", peer_id=self.peer_id, maddrs=self.maddrs, endpoint=self.endpoint,
                         metrics_url=self.metrics_url, stages=self.stages, role="data" if 0 in self.stages else "stage")
        if cfg.initial_peers:
            self._start_thread("reachability", self._check_reachable)

    def _check_reachable(self) -> None:
        """Ask a member to dial us back; say plainly which port to open or flag to set if it cannot."""
        result = self_check(self.directory.members(), self.peer_id, self.endpoint, self.maddrs, self.clients)
        (log.info if result.ok else log.warning)("%s", result.message)
        if not result.ok:
            print(f"swarm-node: {result.message}", file=sys.stderr, flush=True)
        self.events.emit("reachability", ok=result.ok, message=result.message)

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Stopped()

    def _start_dht(self) -> DHT:
        cfg = self.config
        kwargs = dict(host_maddrs=[f"/ip4/{cfg.host}/tcp/{cfg.dht_port}"], start=True,
                      initial_peers=cfg.initial_peers or [], shutdown_timeout=cfg.child_exit_timeout,
                      **self.trust.dht_kwargs())
        if cfg.announce_host:
            kwargs["announce_maddrs"] = [f"/ip4/{cfg.announce_host}/tcp/{cfg.dht_port}"]
        try:
            return DHT(**kwargs)
        except Exception as e:  # hivemind raises plain exceptions for bad multiaddrs and unreachable peers
            raise UsageError(f"could not start or join the DHT ({e}); check --initial-peers and --dht-port") from None

    def _choose_stages(self) -> list[int]:
        """The stages to host by --role and --stages (node/roles.py); none for the expert role."""
        cfg = self.config
        members = self.directory.members() if cfg.initial_peers and cfg.role != Role.EXPERT else {}
        return choose_stages(cfg.role, cfg.hosted_stages(), members, cfg.num_stages, cfg.min_replicas)

    def _left_out(self, rounds: int) -> bool:
        """An auto node the plans have not used for --idle-rounds rounds trains experts instead."""
        if rounds < self.config.idle_rounds:
            return False
        log.info("left out of %d plans in a row: switching to experts", rounds)
        self.relaunch = relaunch_args(Role.AUTO, "auto")
        self.events.emit("relaunch", role="auto", stage=None)
        return True

    def _measure_compute(self, modules: dict[int, PipelineStage]) -> dict[int, float]:
        """Seconds per microbatch forward on this host, per stage: what planners weigh replicas by."""
        cfg = self.config
        hidden = torch.zeros(cfg.batch_size, cfg.seq_len, self.spec.config.hidden_size, device=self.device,
                             dtype=self.dtype)
        out = {}
        with torch.no_grad():
            for s, m in modules.items():
                m(hidden)
                started = time.perf_counter()
                m(hidden)
                out[s] = time.perf_counter() - started
        return out

    def _make_origin(self) -> Origin | None:
        if 0 not in self.stages:
            return None
        cfg = self.config
        data = _usage(load_corpus, cfg.data, cfg.dataset or None, self.tokenizer)
        return Origin(cfg.swarm, self.executor, data, cfg.batch_size, cfg.seq_len, cfg.max_inflight, cfg.seed)

    def _make_round_loop(self) -> RoundLoop:
        cfg = self.config
        settings = RoundSettings(swarm=cfg.swarm, num_stages=cfg.num_stages, visits=cfg.visits or cfg.num_stages,
                                 microbatches=cfg.microbatches, activation_bytes=self.activation_bytes,
                                 round_timeout=cfg.round_timeout, max_rounds=cfg.rounds, min_nodes=cfg.min_nodes,
                                 activation_shape=(cfg.batch_size, cfg.seq_len, self.spec.config.hidden_size),
                                 hop_deadline_slack=cfg.hop_deadline_slack, hop_deadline_min=cfg.hop_deadline_min,
                                 checkpoint_every=cfg.checkpoint_every)
        faults = Faults(self.resilience.dead, self.resilience.notifier, self.resilience.watch,
                        self.resilience.checkpoints)
        links = LinkBook(self.dht, cfg.swarm, self.link_meter, ping_with(self.clients, self.emulator),
                         ttl=max(60.0, 4 * cfg.round_timeout), owner=self.trust.owner, settings=self.link_meter.s,
                         read_timeout=cfg.dht_read_timeout)
        return RoundLoop(settings, self.peer_id, self.directory, self.executor, self.trainers, self.exchange,
                         self.origin, self.clients, self.metrics, self.events, faults, links=links)

    def _start_grpc(self) -> None:
        cfg = self.config
        self.guard = StreamGuard(StreamLimits(workers=cfg.grpc_workers, idle_s=cfg.stream_idle_timeout),
                                 on_refused=lambda reason: self.metrics.streams_refused.labels(reason).inc())
        self._teardown.callback(self.guard.close)
        self.server = grpc.server(ThreadPoolExecutor(max_workers=cfg.grpc_workers, thread_name_prefix="grpc"),
                                  options=server_options(self.limits),
                                  # the guard outermost, so that it also counts the auth interceptor's refusals
                                  interceptors=[RpcGuard(self.metrics), *self.trust.server_interceptors(self.metrics)])
        # A tensor never exceeds twice this swarm's activation size: larger ones are refused from their header.
        activation = cfg.batch_size * cfg.seq_len * self.spec.config.hidden_size * self.dtype.itemsize
        limits = dataclasses.replace(self.limits, max_tensor_bytes=min(self.limits.max_tensor_bytes, 2 * activation))
        self.servicer = StageServicer(swarm=cfg.swarm, peer_id=self.peer_id, num_stages=cfg.num_stages,
                                      executor=self.executor, trainers=self.trainers, limits=limits,
                                      metrics=self.metrics, state_wait_s=cfg.state_transfer_timeout,
                                      exchange=self.exchange, on_failure_report=self.resilience.on_failure_report,
                                      checkpoint_state=self.resilience.checkpoint_state,
                                      auth=self.trust.auth, admission=HopAdmission(self.directory), guard=self.guard,
                                      dial_back=lambda request, caller: dial_back(request, caller, self.clients))
        self.server.add_generic_rpc_handlers((stage_service_handler(self.servicer),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        port = self.trust.add_port(self.server, cfg.host, cfg.port)
        self.server.start()
        self._teardown.callback(lambda: self.server.stop(grace=cfg.drain_grace).wait())
        self.endpoint = f"{cfg.announce_host or cfg.host}:{cfg.announce_port or port}"
        if self.emulator is not None:
            self.emulator.bind(self.endpoint)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def _set_health(self, status) -> None:
        for name in ("", "swarm.v1.StageService"):
            self.health.set(name, status)

    def _start_metrics(self) -> None:
        try:
            server, _, port = self.metrics.serve(self.config.host, self.config.metrics_port)
        except OSError as e:
            raise UsageError(f"cannot serve metrics on port {self.config.metrics_port}: {e.strerror}") from None
        self._teardown.callback(server.shutdown)
        self.metrics_url = f"http://{self.config.announce_host or self.config.host}:{port}/metrics"

    def _start_thread(self, name: str, target) -> None:
        """A helper thread that returns once `stop` is set; shutdown waits briefly for it."""
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._teardown.callback(thread.join, self.config.dht_write_timeout)

    # ---- joining, state, leaving ------------------------------------------------------------------------------
    def _copy_swarm_state(self) -> int:
        """Each stage from its checkpoint, a replica, or a rebuild (node/control/restore.py); returns the round to start at."""
        cfg = self.config
        return recover_stages(self.trainers, self.directory.members() if cfg.initial_peers else {}, self.peer_id,
                              cfg.swarm, cfg.num_stages, self.clients,
                              StageCheckpoints(cfg.checkpoint_dir) if cfg.checkpoint_dir else None, self.metrics,
                              self.events.emit, self.stop, cfg.state_transfer_timeout)

    def _serve_when_ready(self) -> None:
        """Become `serving` (plannable) once this node has begun its first round, or when nobody has planned
        that round yet: a plan that includes us is then at most one round ahead, which the executor parks."""
        if self.state is not NodeState.JOINING or self._first_round is None:
            return
        if self.executor.round >= self._first_round or self.directory.fetch_plan(self._first_round) is None:
            self._set_state(NodeState.SERVING)
            self.events.emit("serving", peer_id=self.peer_id, first_round=self._first_round)

    def _set_state(self, state: NodeState) -> None:
        self.state = state
        self.metrics.state.state(state.value)
        if state is not NodeState.LEFT:
            self._announce()

    def _leave(self) -> None:
        """Draining: health says NOT_SERVING and the record says so; then the tombstone (`left`) replaces it."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._set_state(NodeState.DRAINING)
        if not self.directory.withdraw(timeout=self.config.dht_write_timeout):
            log.warning("could not store the tombstone in the DHT; the record expires in %.0f s",
                        self.config.record_ttl)
        self.state = NodeState.LEFT
        self.metrics.state.state(NodeState.LEFT.value)

    def _interrupt_waits_on_stop(self) -> None:
        """Once stop is set, end the waits that do not watch the stop event themselves."""
        self.stop.wait()
        self.clients.close()  # ends outgoing calls in flight: sends, pings, state transfers
        for trainer in self.trainers.values():
            trainer.close()  # ends FetchState handlers waiting for a round
        if self.origin is not None:
            self.origin.interrupt()

    # ---- data plane glue -------------------------------------------------------------------------------------
    def _send(self, kind: str, env, tensor) -> None:
        self.sender(kind, env, tensor)

    def _accept_local(self, kind: str, env, tensor) -> None:
        (self.executor.accept_forward if kind == "forward" else self.executor.accept_backward)(env, tensor)

    # ---- heartbeat -------------------------------------------------------------------------------------------
    def _record(self) -> NodeRecord:
        return NodeRecord(peer_id=self.peer_id, endpoint=self.endpoint, stages=tuple(self.stages),
                          compute_s=self.executor.compute_seconds() or self._compute_s,
                          memory_slots=self._planned_slots(), role="data" if 0 in self.stages else "stage",
                          version=VERSION, swarm=self.config.swarm, round=max(self.executor.round, 0),
                          state=self.state, metrics_url=self.metrics_url, maddrs=tuple(self.maddrs),
                          heartbeat_time=get_dht_time(), codecs=(self.config.activation_codec,
                                                                 self.config.gradient_codec), speaks=CODEC_NAMES,
                          num_stages=self.config.num_stages)

    def _planned_slots(self) -> int:
        """Microbatches planners may route through us at once: an origin keeps at most max_inflight of its own."""
        cfg = self.config
        return min(cfg.memory_slots, cfg.max_inflight) if 0 in self.stages else cfg.memory_slots

    def _announce(self) -> None:
        if not self.directory.announce(self._record(), timeout=self.config.dht_write_timeout):
            log.debug("heartbeat not confirmed by the DHT")

    def _heartbeat_loop(self) -> None:
        """Refresh our record; the heartbeat age metric is read from our record as the DHT returns it."""
        stored = get_dht_time()
        self.metrics.track_heartbeat_age(lambda: max(0.0, get_dht_time() - stored))
        while not self.stop.wait(self.config.heartbeat_interval):
            try:
                self._serve_when_ready()
                self._announce()
                members = self.directory.members()
            except Exception as e:  # the DHT may be shutting down; the next beat retries
                log.debug("heartbeat failed: %r", e)
                continue
            self.metrics.visible_peers.set(len(members))
            if self.peer_id in members:
                stored = members[self.peer_id].heartbeat_time


class Stopped(Exception):
    """Stop was requested while the node was still being built."""


def _check_port_free(host: str, port: int, what: str, flag: str) -> None:
    """Refuse a taken fixed port (0 picks a free one later). The probe sets SO_REUSEADDR as gRPC does, so
    only a port someone listens on is refused."""
    if not port:
        return
    try:
        family, _, _, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise UsageError(f"cannot serve {what} on {host}:{port}: {e.strerror}") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise UsageError(f"cannot serve {what} on {host}:{port}: {e.strerror}; pick another {flag}") from None


def _usage(fn, *args):
    """Run a set-up step whose ValueErrors are the user's to fix."""
    try:
        return fn(*args)
    except ValueError as e:
        raise UsageError(str(e)) from None
