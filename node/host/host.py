"""The host: what every node has, whatever its role (hivemind's and Petals' `Server`).

`NodeHost.create` starts the identity and trust, the DHT (a forked process, so before any thread), the
member directory, /metrics, the outgoing channels and the gRPC server's port. `serve(role)` then starts the
server (with its options, stream guard, auth and health) over the handlers the role hands it, and the
heartbeat that announces what the role advertises. A role receives `HostServices` and never sees the host.

Stopping is two steps because a role's parts must outlive the server's in-flight calls but not the DHT:
`stop_serving` (health NOT_SERVING, the draining record and the tombstone, then the server drains),
the role stops, then `close` (metrics, channels, DHT, trust).
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from node import VERSION
from node.config import NodeConfig
from node.control.discovery import SwarmDirectory
from node.dataplane.link_emulation import LinkEmulator
from node.dataplane.transport import StageClients
from node.errors import UsageError
from node.events import EventLog
from node.host.addresses import WILDCARDS, announced_host
from node.host.metrics import NodeMetrics
from node.host.reachability import NOT_CHECKED, Reachability, self_check
from node.host.rpc_guard import RpcGuard
from node.host.stream_guard import StreamGuard
from node.host.trust import NodeTrust
from node.relay.server import NotARelay, RelayServer
from node.relay.tunnel import RelayTunnel
from node.process.children import die_with_parent
from protocol.grpc_options import server_options
from protocol.limits import WireLimits
from protocol.records import NodeRecord, NodeState, Reach
from protocol.service import relay_service_handler
from protocol.sync_names import EVERY_ROUND

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Advertised:
    """What a role says of itself in the node's record; the host adds identity, address, state and time."""

    role: str  # "data", "stage" or "expert"
    stages: tuple[int, ...] = ()
    compute_s: dict[int, float] | None = None
    memory_slots: int = 0
    round: int = 0
    num_stages: int = 0
    codecs: tuple[str, str] = ("raw", "raw")
    speaks: tuple[str, ...] = ("raw",)
    sync: str = EVERY_ROUND
    sync_every: int = 1
    sync_state: dict[int, dict[str, float]] | None = None  # by stage: its last sync ({round, bytes, seconds, drift})
    bans: dict[str, dict] | None = None  # peers it keeps out of its plans now: {offences, until, reason, accuser}
    witnessed: dict[str, dict[str, int]] | None = None  # the work each peer did for it: {hops, tokens, passed, failed}


class Presence:
    """This node's record in the DHT: its state, the heartbeat that refreshes it, and the tombstone."""

    def __init__(self, directory: SwarmDirectory, metrics: NodeMetrics, base: NodeRecord, write_timeout: float,
                 record_ttl: float, will_check: bool):
        self.directory = directory
        self.metrics = metrics
        self.base = base  # identity and addresses; state, time and the role's part change
        self.write_timeout = write_timeout
        self.record_ttl = record_ttl
        self.state = NodeState.JOINING
        self.reachability: Reachability = NOT_CHECKED
        # Set once the first reachability check has answered (at once when none will run): a joining node
        # serves only when it knows whether peers can dial it, so that it is not planned on a guess.
        self.reach_known = threading.Event()
        if not will_check:
            self.reach_known.set()
        self._advertised: Callable[[], Advertised] = lambda: Advertised(role="")

    def advertise(self, advertised: Callable[[], Advertised]) -> None:
        self._advertised = advertised

    def record(self) -> NodeRecord:
        a = self._advertised()
        return replace(self.base, role=a.role, stages=a.stages, compute_s=dict(a.compute_s or {}),
                       memory_slots=a.memory_slots, round=a.round, num_stages=a.num_stages, codecs=a.codecs,
                       speaks=a.speaks, sync=a.sync, sync_every=a.sync_every, sync_state=dict(a.sync_state or {}),
                       bans=dict(a.bans or {}), witnessed=dict(a.witnessed or {}),
                       state=self.state, reach=self.reachability.reach, via=self.reachability.via,
                       heartbeat_time=get_dht_time())

    def set_state(self, state: NodeState) -> None:
        self.state = state
        self.metrics.state.state(state.value)
        if state is not NodeState.LEFT:
            self.announce()

    def set_reachability(self, result: Reachability, endpoint: str = "") -> None:
        """The latest check's answer; `endpoint`: announce this one instead (peers reached us there, or reach
        us at our relay). Announced at once when the class, relay or endpoint changes, so planners see it
        before the next beat."""
        changed = (result.reach is not self.reachability.reach or result.via != self.reachability.via
                   or (endpoint and endpoint != self.base.endpoint))
        self.reachability = result
        if endpoint:
            self.base = replace(self.base, endpoint=endpoint)
        self.reach_known.set()
        if changed and self.state is not NodeState.LEFT:
            self.announce()

    def announce(self) -> None:
        if not self.directory.announce(self.record(), timeout=self.write_timeout):
            log.debug("heartbeat not confirmed by the DHT")

    def leave(self) -> None:
        """Draining first (planners drop us), then the tombstone (`left`) replaces the record."""
        self.set_state(NodeState.DRAINING)
        if not self.directory.withdraw(timeout=self.write_timeout):
            log.warning("could not store the tombstone in the DHT; the record expires in %.0f s", self.record_ttl)
        self.set_state(NodeState.LEFT)


class Served(Protocol):
    """What a role hands its host to serve."""

    health_names: tuple[str, ...]  # gRPC services the health server reports on, besides the server's ""

    def register(self, server: grpc.Server) -> None:
        """Add the role's gRPC services to the host's server (before it starts)."""

    def advertised(self) -> Advertised: ...

    def on_beat(self) -> None:
        """Called before each heartbeat."""

    def started(self) -> None:
        """The server serves the role's services now."""

    def interrupt(self) -> None:
        """The node is stopping: end the role's waits that do not watch the stop event."""


@dataclass(frozen=True)
class HostServices:
    """What a role may use of its host. Everything here is started by the host and stopped by it."""

    peer_id: str
    maddrs: tuple[str, ...]
    endpoint: str  # host:port peers dial this node's gRPC server at
    metrics_url: str
    dht: DHT
    directory: SwarmDirectory  # the swarm's member records and round plans
    trust: NodeTrust  # identity, the swarm key's RPC auth and TLS
    clients: StageClients  # outgoing channels, closed (ending calls in flight) once the node stops
    metrics: NodeMetrics  # the node's one registry, served at /metrics
    events: EventLog
    presence: Presence  # the node's record: the role says when it serves
    guard: StreamGuard  # admission of Forward/Backward streams to the server's workers
    stop: threading.Event


class NodeHost:
    def __init__(self, config: NodeConfig, stop: threading.Event, limits: WireLimits, events: EventLog):
        self.config = config
        self.stop = stop
        self.limits = limits
        self.events = events
        self.metrics = NodeMetrics()
        self._open = ExitStack()  # undone by close()
        self._serving = ExitStack()  # undone by stop_serving()
        self.endpoint = ""
        self.metrics_url = ""
        self.relay: RelayServer | None = None  # carries connections to members behind NAT (--relay-limit > 0)
        self.tunnel: RelayTunnel | None = None  # ours to a relay, while peers cannot dial us
        self._unreachable: Reachability | None = None  # the last check that found us unreachable
        self._attachments = 0  # to relays so far: a detach that outlived its grace tells by this
        self._tunnel_lock = threading.Lock()

    @classmethod
    def create(cls, config: NodeConfig, stop: threading.Event, limits: WireLimits, events: EventLog) -> "NodeHost":
        """Identity, DHT, directory and channels; on failure (or a stop meanwhile) undo what was done and raise."""
        host = cls(config, stop, limits, events)
        try:
            host._open_all()
        except BaseException:
            host.close()
            raise
        return host

    def _open_all(self) -> None:
        cfg, net, undo = self.config, self.config.network, self._open
        # Before the DHT starts, so that a taken port fails at once.
        check_port_free(net.host, net.port, "gRPC", "--port")
        check_port_free(net.host, net.metrics_port, "metrics", "--metrics-port")
        if cfg.relay.limit:
            check_port_free(net.host, cfg.relay.port, "relay tunnels", "--relay-port")
        self.trust = NodeTrust.create(net.identity_path, cfg.swarm.swarm_key, net.tls, net.tls_cert, net.tls_key)
        undo.callback(self.trust.close)
        die_with_parent()  # the DHT's forked process dies with us (node/process/children.py)
        self.dht = self._start_dht()
        undo.callback(self.dht.shutdown)
        self.peer_id = self.dht.peer_id.to_base58()
        self.maddrs = tuple(str(m) for m in self.dht.get_visible_maddrs())
        self.metrics.watch_dht_refusals(lambda: self.trust.refused_records.value)
        self.directory = SwarmDirectory(self.dht, cfg.swarm.id, self.peer_id, ttl=cfg.swarm.record_ttl,
                                        owner=self.trust.owner,
                                        on_dropped=lambda reason: self.metrics.records_dropped.labels(reason).inc(),
                                        read_timeout=cfg.swarm.dht_read_timeout, stop=self.stop,
                                        recheck_s=cfg.lifecycle.recheck_interval)
        self.guard = StreamGuard(cfg.dataplane, cfg.lifecycle.recheck_interval,
                                 on_refused=lambda reason: self.metrics.streams_refused.labels(reason).inc())
        undo.callback(self.guard.close)
        workers = ThreadPoolExecutor(max_workers=cfg.dataplane.grpc_workers, thread_name_prefix="grpc")
        self.server = grpc.server(workers,
                                  options=server_options(self.limits),
                                  # the guard outermost, so that it also counts the auth interceptor's refusals
                                  interceptors=[RpcGuard(self.metrics),
                                                *self.trust.server_interceptors(self.metrics, self.peer_id)])
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        port = self.trust.add_port(self.server, net.host, net.port)
        self.announce_host = announced_host(net.host, net.announce_host, cfg.swarm.initial_peers)  # never 0.0.0.0
        self.endpoint = f"{self.announce_host}:{net.announce_port or port}"
        # Where a relayed connection is handed to our own server.
        self.local_target = f"{'127.0.0.1' if net.host in WILDCARDS else net.host}:{port}"
        if cfg.relay.limit:
            self.relay = RelayServer.create(cfg.relay, net.host, self.announce_host, cfg.swarm.id, self.metrics,
                                            cfg.lifecycle.recheck_interval, reachable=lambda: self.presence.reachability
                                            .reach in (Reach.DIRECT, Reach.UNCHECKED))
            undo.callback(self.relay.close)
        emulator = None
        if cfg.links.emulate_links:  # a test tool: every call this node makes pays the emulated links
            emulator = LinkEmulator.load(cfg.links.emulate_links)
            emulator.bind(self.endpoint)
        self.clients = StageClients(self.limits, self.trust.auth, self.trust.tls, self.metrics.count_frame, emulator)
        undo.callback(self.clients.close)
        try:
            metrics_server, _, metrics_port = self.metrics.serve(net.host, net.metrics_port)
        except OSError as e:
            raise UsageError(f"cannot serve metrics on port {net.metrics_port}: {e.strerror}") from None
        undo.callback(metrics_server.shutdown)
        self.metrics_url = f"http://{self.announce_host}:{metrics_port}/metrics"
        self.presence = Presence(self.directory, self.metrics, NodeRecord(
            peer_id=self.peer_id, endpoint=self.endpoint, stages=(), compute_s={}, memory_slots=0, role="",
            version=VERSION, swarm=cfg.swarm.id, round=0, state=NodeState.JOINING, maddrs=self.maddrs,
            metrics_url=self.metrics_url),
            write_timeout=cfg.swarm.dht_write_timeout, record_ttl=cfg.swarm.record_ttl,
            will_check=bool(cfg.swarm.initial_peers))
        self.services = HostServices(peer_id=self.peer_id, maddrs=self.maddrs, endpoint=self.endpoint,
                                     metrics_url=self.metrics_url, dht=self.dht, directory=self.directory,
                                     trust=self.trust, clients=self.clients, metrics=self.metrics, events=self.events,
                                     presence=self.presence, guard=self.guard, stop=self.stop)

    def _start_dht(self) -> DHT:
        cfg, net = self.config, self.config.network
        kwargs = dict(host_maddrs=[f"/ip4/{net.host}/tcp/{net.dht_port}"], start=True,
                      initial_peers=cfg.swarm.initial_peers or [], shutdown_timeout=cfg.lifecycle.child_exit_timeout,
                      **self.trust.dht_kwargs())
        if net.announce_host:
            kwargs["announce_maddrs"] = [f"/ip4/{net.announce_host}/tcp/{net.dht_port}"]
        try:
            return DHT(**kwargs)
        except Exception as e:  # hivemind raises plain exceptions for bad multiaddrs and unreachable peers
            raise UsageError(f"could not start or join the DHT ({e}); check --initial-peers and --dht-port") from None

    # ---- serving ---------------------------------------------------------------------------------------------
    def serve(self, role: "Served") -> None:
        """Start the gRPC server over the role's handlers, and the heartbeat that announces what it advertises
        every --heartbeat-interval."""
        cfg, undo = self.config, self._serving
        role.register(self.server)
        self.server.add_generic_rpc_handlers((relay_service_handler(self.relay or NotARelay(self.metrics),
                                                                    self.metrics.count_frame),))
        undo.callback(self._close_tunnel)  # after the server drained: hops in flight may come through it
        self.server.start()
        undo.callback(lambda: self.server.stop(grace=cfg.lifecycle.drain_grace).wait())
        self.presence.advertise(role.advertised)
        self._health_names = ("", *role.health_names)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._start_thread("heartbeat", lambda: self._heartbeat(role.on_beat))
        self._start_thread("interrupter", lambda: self._interrupt_on_stop(role.interrupt))
        undo.callback(self._leave)
        self.presence.announce()
        if cfg.swarm.initial_peers:  # the first node of a swarm has nobody to ask
            self._start_thread("reachability", self._watch_reachability)
        role.started()

    def _leave(self) -> None:
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.presence.leave()

    def _set_health(self, status) -> None:
        for name in self._health_names:
            self.health.set(name, status)

    def _start_thread(self, name: str, target: Callable[[], None]) -> None:
        """A helper thread that returns once `stop` is set; stop_serving waits briefly for it."""
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._serving.callback(thread.join, self.config.swarm.dht_write_timeout)

    def _heartbeat(self, on_beat: Callable[[], None]) -> None:
        """Refresh our record; the heartbeat age metric is read from our record as the DHT returns it."""
        stored = get_dht_time()
        self.metrics.track_heartbeat_age(lambda: max(0.0, get_dht_time() - stored))
        while not self.stop.wait(self.config.swarm.heartbeat_interval):
            try:
                on_beat()
                self.presence.announce()
                members = self.directory.members()
            except Exception as e:  # the DHT may be shutting down; the next beat retries
                log.debug("heartbeat failed: %r", e)
                continue
            self.metrics.visible_peers.set(len(members))
            self.clients.follow({p: r.endpoint for p, r in members.items()},
                                relayed={p for p, r in members.items() if r.reach is Reach.RELAYED})
            if self.peer_id in members:
                stored = members[self.peer_id].heartbeat_time

    def _watch_reachability(self) -> None:
        """Ask a member to dial us back, at start and every --reachability-recheck seconds; say plainly, once per
        change of class, which port to forward or flag to set. Retried sooner while nobody could be asked."""
        net = self.config.network
        last: tuple[Reach, bool] | None = None
        while not self.stop.is_set():
            try:
                result = self_check(self.directory.members(), self.peer_id, self.endpoint, list(self.maddrs),
                                    self.clients, timeout=net.reachability_timeout)
            except Exception as e:  # the DHT or channels are closing; the next check retries
                log.debug("reachability check failed: %r", e)
                result = Reachability(Reach.UNCHECKED, True, f"reachability check failed: {e!r}")
            known = self.presence.reachability.reach is not Reach.UNCHECKED
            if result.reach is Reach.UNCHECKED and known:  # nobody to ask this time: what we knew still holds
                log.debug("%s", result.message)
                if not net.reachability_recheck or self.stop.wait(net.reachability_recheck):
                    return
                continue
            # Our own guess of our address gives way to where peers reached us; the operator's never does.
            moved = result.endpoint if result.reach is Reach.DIRECT and not net.announce_host else ""
            if (result.reach, result.ok) != last:
                last = (result.reach, result.ok)
                if result.ok:
                    log.info("%s", result.message)
                elif log.isEnabledFor(logging.WARNING):  # one line: the log is on stderr already
                    log.warning("%s", result.message)
                else:  # --log-level error hides it, yet the operator must see it
                    print(f"swarm-node: {result.message}", file=sys.stderr, flush=True)
                self.events.emit("reachability", ok=result.ok, reach=result.reach.value, message=result.message,
                                 endpoint=moved or self.presence.record().endpoint, via="")
            self._relay_for(result)
            if result.reach is Reach.DIRECT:  # at our own endpoint again, should a relay have carried us
                self.presence.set_reachability(result, moved or self.endpoint)
            elif not (result.reach is Reach.UNREACHABLE and self.presence.reachability.reach is Reach.RELAYED):
                self.presence.set_reachability(result, moved)
            wait = net.reachability_timeout if result.reach is Reach.UNCHECKED else net.reachability_recheck
            if not wait or self.stop.wait(wait):
                return

    # ---- relays ----------------------------------------------------------------------------------------------
    def _relay_for(self, result: Reachability) -> None:
        """Unreachable: attach to a relay member (once; the tunnel moves between relays by itself). Directly
        reachable again (a port forwarded): detach, and take hops directly."""
        if result.reach is Reach.DIRECT:
            self._close_tunnel()
            return
        if result.reach is not Reach.UNREACHABLE:
            return
        with self._tunnel_lock:
            self._unreachable = result
            if self.tunnel is None and not self.stop.is_set():
                self.tunnel = RelayTunnel.create(self.peer_id, self.config.swarm.id, self.directory.members,
                                                 self.clients, self.local_target, self.config.relay, self.stop,
                                                 on_attached=self._attached, on_detached=self._detached)

    def _attached(self, endpoint: str, relay: str) -> None:
        finding = self._unreachable.why if self._unreachable else "not reachable directly"
        port = self.endpoint.rpartition(":")[2]
        result = Reachability(Reach.RELAYED, True, f"reachable through relay {relay[-8:]} at {endpoint} ({finding}); "
                                                   f"forward TCP port {port} (--port) to this host for direct hops",
                              endpoint=endpoint, finding=finding, via=relay)
        with self._tunnel_lock:
            self._attachments += 1
        log.info("%s", result.message)
        self.presence.set_reachability(result, endpoint)
        self.events.emit("reachability", ok=True, reach=result.reach.value, message=result.message,
                         endpoint=endpoint, via=relay)

    def _detached(self, why: str) -> None:
        """Our relay let go. The tunnel attaches to the next one at once, usually; meanwhile our record keeps
        the old relay (announcing `unreachable` would take us out of plans, and a data node out of planning
        the round). Only when no relay took us within --relay-tunnel-timeout do we say so."""
        if self.stop.is_set():
            return
        log.warning("relay %s no longer carries this node (%s): attaching to another",
                    self.presence.reachability.via[-8:], why)
        with self._tunnel_lock:
            attachments = self._attachments
        timer = threading.Timer(self.config.relay.tunnel_timeout, self._still_detached, args=(attachments, why))
        timer.daemon = True
        timer.start()

    def _still_detached(self, attachments: int, why: str) -> None:
        with self._tunnel_lock:
            if self._attachments != attachments or self.tunnel is None or self.stop.is_set():
                return
        result = self._unreachable or Reachability(Reach.UNREACHABLE, False, "not reachable directly")
        log.warning("no relay carries this node: %s", result.why)
        self.presence.set_reachability(result, self.endpoint)
        self.events.emit("reachability", ok=False, reach=result.reach.value, message=f"relay lost: {why}",
                         endpoint=self.endpoint, via="")

    def _close_tunnel(self) -> None:
        with self._tunnel_lock:
            tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            tunnel.close()

    def _interrupt_on_stop(self, interrupt_role: Callable[[], None]) -> None:
        """Once stop is set, end the outgoing calls in flight (sends, pings, state transfers) and the role's
        waits that do not watch the stop event themselves."""
        self.stop.wait()
        self.clients.close()
        interrupt_role()

    # ---- stopping --------------------------------------------------------------------------------------------
    def stop_serving(self) -> None:
        """Withdraw (draining record, tombstone), stop the heartbeat, drain the server."""
        self.stop.set()
        self._serving.close()

    def close(self) -> None:
        """Close /metrics, the channels, the stream guard, the DHT and the trust material (after stop_serving)."""
        self.stop.set()
        self._serving.close()
        self._open.close()


def check_port_free(host: str, port: int, what: str, flag: str) -> None:
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
