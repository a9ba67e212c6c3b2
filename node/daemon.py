"""The node daemon: start-up, serving, the round loop, and a clean shutdown.

Start-up order matters: the DHT and the gradient averagers are forked processes, so they start
before this process creates any thread (gRPC, compute, heartbeat).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

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
from node.averaging import StageGradientAverager
from node.config import NodeConfig
from node.discovery import SwarmDirectory
from node.errors import UsageError
from node.events import EventLog
from node.executor import StageExecutor
from node.metrics import NodeMetrics
from node.origin import Origin
from node.rounds import RoundLoop, RoundSettings
from node.servicer import VERSION, StageServicer
from node.trainer import StageTrainer
from node.transport import HopSender, StageClients
from node.admission import HopAdmission
from node.stream_guard import StreamGuard, StreamLimits
from node.trust import NodeTrust
from protocol.grpc_options import server_options
from protocol.limits import WireLimits
from protocol.service import stage_service_handler
from protocol.records import NodeRecord

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, config: NodeConfig, limits: WireLimits = WireLimits()):
        self.config = config
        self.limits = limits
        self.metrics = NodeMetrics()
        self.events = EventLog(config.events_file)
        self.stop_event = threading.Event()
        self._started: list[str] = []  # what shutdown must undo, in start order

    # ---- start-up --------------------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
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

        self.trust = NodeTrust.create(cfg.identity_path, cfg.swarm_key)
        self._started.append("trust")
        self.dht = self._start_dht()
        self.peer_id = self.dht.peer_id.to_base58()
        self.maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
        self.metrics.watch_dht_refusals(lambda: self.trust.refused_records.value)
        self.directory = SwarmDirectory(self.dht, cfg.swarm, self.peer_id, ttl=cfg.record_ttl, owner=self.trust.owner,
                                        on_dropped=lambda reason: self.metrics.records_dropped.labels(reason).inc())
        self.stages = self._choose_stages()
        self.averagers = {s: StageGradientAverager(self.dht, cfg.swarm, s, _param_shapes(self.spec, s, cfg),
                                                   timeout=cfg.round_timeout) for s in self.stages}
        self._started.append("averagers")

        modules = {s: _usage(build_stage, self.spec, s, cfg.num_stages, cfg.seed, self.device, self.dtype)
                   for s in self.stages}
        self.trainers = {s: StageTrainer(m, cfg.lr, cfg.weight_decay, cfg.grad_clip, cfg.warmup_rounds)
                         for s, m in modules.items()}
        self.clients = StageClients(self.limits, self.trust.auth)
        first_round = self._sync_state()
        compute_s = self._measure_compute(modules)

        self.executor = StageExecutor(self.peer_id, modules, self.device, self.dtype, cfg.memory_slots,
                                      self.metrics, send=self._send, first_round=first_round)
        self.sender = HopSender(self.peer_id, self.clients, self.metrics, local=self._accept_local,
                                on_give_up=self._gave_up, deadline_s=cfg.round_timeout)
        self.origin = None
        if 0 in self.stages:
            data = _usage(load_corpus, cfg.data, cfg.dataset or None, self.tokenizer)
            self.origin = Origin(cfg.swarm, self.executor, data, cfg.batch_size, cfg.seq_len, cfg.max_inflight,
                                 cfg.seed)
        self.executor.start()
        self._started.append("executor")
        self._start_grpc()
        self._start_metrics()
        self.first_round = first_round
        self._compute_s = compute_s
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._heartbeat_thread.start()
        self._announce()
        self.events.emit("started", peer_id=self.peer_id, maddrs=self.maddrs, endpoint=self.endpoint,
                         metrics_url=self.metrics_url, stages=self.stages, first_round=first_round)

    def _start_dht(self) -> DHT:
        cfg = self.config
        kwargs = dict(host_maddrs=[f"/ip4/{cfg.host}/tcp/{cfg.dht_port}"], start=True,
                      initial_peers=cfg.initial_peers or [], **self.trust.dht_kwargs())
        if cfg.announce_host:
            kwargs["announce_maddrs"] = [f"/ip4/{cfg.announce_host}/tcp/{cfg.dht_port}"]
        try:
            dht = DHT(**kwargs)
        except Exception as e:  # hivemind raises plain exceptions for bad multiaddrs and unreachable peers
            raise UsageError(f"could not start or join the DHT ({e}); check --initial-peers and --dht-port") from None
        self._started.append("dht")
        return dht

    def _choose_stages(self) -> list[int]:
        explicit = self.config.hosted_stages()
        if explicit is not None:
            return explicit
        # auto: the stage with the fewest serving replicas (ties: the earliest), so the swarm fills evenly
        members = self.directory.members() if self.config.initial_peers else {}
        replicas = {s: 0 for s in range(self.config.num_stages)}
        for record in members.values():
            for s in record.stages:
                if s in replicas:
                    replicas[s] += 1
        return [min(replicas, key=lambda s: (replicas[s], s))]

    def _sync_state(self) -> int:
        """A node joining a running swarm copies each stage from a replica; returns the round to start at."""
        members = self.directory.members() if self.config.initial_peers else {}
        swarm_round = max((r.round for r in members.values() if r.serving), default=0)
        for stage, trainer in self.trainers.items():
            sources = sorted(p for p, r in members.items() if r.serving and stage in r.stages and r.round > 0)
            for peer in sources:
                try:
                    completed, tensors, metadata = self.clients.fetch_state(members[peer].endpoint,
                                                                            self.config.swarm, stage)
                except grpc.RpcError as e:
                    log.warning("could not fetch stage %d from %s: %s", stage, peer[-8:], e.details())
                    continue
                trainer.load(tensors, metadata)
                log.info("stage %d: loaded state after round %d from %s", stage, completed, peer[-8:])
                swarm_round = max(swarm_round, completed + 1)
                break
        return swarm_round

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

    def _start_grpc(self) -> None:
        cfg = self.config
        self.guard = StreamGuard(StreamLimits(idle_s=cfg.stream_idle_timeout),
                                 on_refused=lambda reason: self.metrics.streams_refused.labels(reason).inc())
        self.server = grpc.server(ThreadPoolExecutor(max_workers=self.guard.limits.workers, thread_name_prefix="grpc"),
                                  options=server_options(self.limits),
                                  interceptors=self.trust.server_interceptors(self.metrics))
        # A tensor never exceeds twice this swarm's activation size: larger ones are refused from their header.
        activation = cfg.batch_size * cfg.seq_len * self.spec.config.hidden_size * self.dtype.itemsize
        limits = dataclasses.replace(self.limits, max_tensor_bytes=min(self.limits.max_tensor_bytes, 2 * activation))
        self.servicer = StageServicer(swarm=cfg.swarm, peer_id=self.peer_id, num_stages=cfg.num_stages,
                                      executor=self.executor, trainers=self.trainers, limits=limits,
                                      metrics=self.metrics, auth=self.trust.auth,
                                      admission=HopAdmission(self.directory), guard=self.guard)
        self.server.add_generic_rpc_handlers((stage_service_handler(self.servicer),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        try:
            port = self.server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        except RuntimeError:  # grpc reports a failed bind this way
            port = 0
        if port == 0:
            raise UsageError(f"cannot serve gRPC on {cfg.host}:{cfg.port}: is the port taken? Pick another --port")
        self.server.start()
        self._started.append("grpc")
        self.endpoint = f"{cfg.announce_host or cfg.host}:{port}"
        for name in ("", "swarm.v1.StageService"):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def _start_metrics(self) -> None:
        try:
            self.metrics_server, _, port = self.metrics.serve(self.config.host, self.config.metrics_port)
        except OSError as e:
            raise UsageError(f"cannot serve metrics on port {self.config.metrics_port}: {e.strerror}") from None
        self._started.append("metrics")
        self.metrics_url = f"http://{self.config.announce_host or self.config.host}:{port}/metrics"

    # ---- data plane glue -------------------------------------------------------------------------------------
    def _send(self, kind: str, env, tensor) -> None:
        self.sender(kind, env, tensor)

    def _accept_local(self, kind: str, env, tensor) -> None:
        (self.executor.accept_forward if kind == "forward" else self.executor.accept_backward)(env, tensor)

    def _gave_up(self, env, reason: str) -> None:
        if self.origin is not None and env.path and env.path[0].peer_id == self.peer_id:
            self.origin.on_failed(env.round, env.microbatch, reason)

    # ---- heartbeat -------------------------------------------------------------------------------------------
    def _record(self, serving: bool) -> NodeRecord:
        return NodeRecord(peer_id=self.peer_id, endpoint=self.endpoint, stages=tuple(self.stages),
                          compute_s=self.executor.compute_seconds() or self._compute_s,
                          memory_slots=self.config.memory_slots, role="data" if 0 in self.stages else "stage",
                          version=VERSION, swarm=self.config.swarm, round=max(self.executor.round, 0),
                          serving=serving, metrics_url=self.metrics_url, maddrs=tuple(self.maddrs),
                          heartbeat_time=get_dht_time())

    def _announce(self) -> None:
        if self.directory.announce(self._record(serving=True)):
            self._last_heartbeat = time.monotonic()

    def _heartbeat_loop(self) -> None:
        self._last_heartbeat = time.monotonic()
        while not self.stop_event.wait(self.config.heartbeat_interval):
            try:
                self._announce()
                self.metrics.visible_peers.set(len(self.directory.members()))
            except Exception as e:  # the DHT may be shutting down; the next beat retries
                log.debug("heartbeat failed: %r", e)
            self.metrics.heartbeat_age.set(time.monotonic() - self._last_heartbeat)

    # ---- running and stopping --------------------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.config
        activation_bytes = cfg.batch_size * cfg.seq_len * self.spec.config.hidden_size * self.dtype.itemsize
        settings = RoundSettings(swarm=cfg.swarm, num_stages=cfg.num_stages, visits=cfg.visits or cfg.num_stages,
                                 microbatches=cfg.microbatches, activation_bytes=activation_bytes,
                                 round_timeout=cfg.round_timeout, max_rounds=cfg.rounds)
        loop = RoundLoop(settings,
                         self.peer_id, self.directory, self.executor, self.trainers, self.averagers, self.origin,
                         self.clients, self.metrics, self.events)
        loop.run(self.first_round, self.stop_event)

    def shutdown(self) -> None:
        """Stop taking work, withdraw our DHT records, and stop every thread and child process we started."""
        self.stop_event.set()
        started = self._started
        if "grpc" in started:
            for name in ("", "swarm.v1.StageService"):
                self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if "dht" in started:
            try:
                self.directory.withdraw()
            except Exception as e:
                log.warning("could not withdraw DHT records: %r", e)
        if "grpc" in started:
            self.server.stop(grace=1.0).wait(3)
            self.guard.close()
            self.sender.close()
            self.clients.close()
        if "executor" in started:
            self.executor.stop()
        if "metrics" in started:
            self.metrics_server.shutdown()
        if "averagers" in started:
            for averager in self.averagers.values():
                averager.shutdown()
        if "dht" in started:
            self.dht.shutdown()
        if "trust" in started:
            self.trust.close()
        self.events.emit("stopped", peer_id=getattr(self, "peer_id", None))


def _param_shapes(spec: ModelSpec, stage: int, cfg: NodeConfig) -> list[torch.Size]:
    """Parameter shapes of a stage without allocating it (the averager needs them before any thread starts)."""
    layers = stage_layers(spec.config.num_hidden_layers, cfg.num_stages)
    with torch.device("meta"):
        module = PipelineStage(spec.config, stage, layers[stage])
    return [p.shape for p in module.parameters() if p.requires_grad]


def _usage(fn, *args):
    """Run a set-up step whose ValueErrors are the user's to fix."""
    try:
        return fn(*args)
    except ValueError as e:
        raise UsageError(str(e)) from None
