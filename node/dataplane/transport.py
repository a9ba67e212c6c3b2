"""The client side of the data plane: sends hops to peers over gRPC, retrying while the receiver is busy."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from node.dataplane.codec_agreement import RoundCodecs
from node.dataplane.link_emulation import EmulatedStub, LinkEmulator
from node.host.metrics import NodeMetrics
from node.stage.witness import receipt_tokens
from node.process.waits import wait_until
from protocol.errors import ProtocolError
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.grpc_options import channel_options
from protocol.limits import WireLimits
from protocol.rpc_auth import UNBOUND, ClientAuthInterceptor, SwarmAuth
from node.dataplane.traffic import LinkTraffic
from protocol.service import STAGE_SERVICE, FrameMeter, RelayStub, StageStub, no_meter
from protocol.tls import SwarmTls
from protocol.state_frames import decode_state
from protocol.tensor_frames import encode_frames

log = logging.getLogger(__name__)

# Statuses that mean "try again shortly": the receiver is busy, or briefly unreachable.
RETRYABLE = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}

LocalAccept = Callable[[str, pb.Envelope, torch.Tensor], None]
GiveUp = Callable[[pb.Envelope, "grpc.StatusCode | None", str], None]  # (envelope of the failed hop, code, why)


class ClientsClosed(grpc.RpcError):
    """A call attempted after `StageClients.close()`: the node is stopping."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return "this node is stopping"


def dial(endpoint: str, options: list, auth: SwarmAuth | None, tls: SwarmTls | None, receiver: str
         ) -> tuple[grpc.Channel, grpc.Channel]:
    """A channel to a member as the swarm's trust settings require: (the channel to close, the one to call on).

    TLS when the swarm runs it; in a private swarm, an auth tag bound to `receiver` (the member's peer id
    from its signed record, or UNBOUND) on every call.
    """
    if tls is None:
        raw = grpc.insecure_channel(endpoint, options=options)
    else:
        raw = grpc.secure_channel(endpoint, tls.channel_credentials(), options=[*options, *tls.channel_options()])
    return raw, bound(raw, auth, receiver)


def bound(raw: grpc.Channel, auth: SwarmAuth | None, receiver: str) -> grpc.Channel:
    """`raw` with tags bound to `receiver` on every unary call (a private swarm); `raw` itself in a public one."""
    return raw if auth is None else grpc.intercept_channel(raw, ClientAuthInterceptor(auth, receiver))


class StageClients:
    """One channel per peer endpoint, reused for every call; `codecs` says how each round's tensors are encoded."""

    def __init__(self, limits: WireLimits, auth: SwarmAuth | None = None, tls: SwarmTls | None = None,
                 meter: FrameMeter = no_meter, emulator: LinkEmulator | None = None):
        self.limits = limits
        self.meter = meter  # counts every message the stubs send and receive (the node's byte counters)
        self.traffic = LinkTraffic()  # the same bytes by link and kind, for calls to a known peer
        self.emulator = emulator  # a test tool: every call pays the emulated link both ways (link_emulation.py)
        self.codecs = RoundCodecs()
        self.auth = auth  # private swarms: every call carries a tag made with the swarm key
        self.tls = tls  # the swarm's certificate, when the data plane runs over TLS
        self._stubs: dict[tuple[str, str], StageStub | EmulatedStub] = {}  # (endpoint, receiver) -> stub
        self._channels: dict[str, grpc.Channel] = {}  # endpoint -> its one connection
        self._announced: dict[str, str] = {}  # peer id -> the endpoint its latest record announces
        self._relayed: set[str] = set()  # peers whose latest record says they are reached through a relay
        self._lock = threading.Lock()
        self.closed = False

    def follow(self, announced: dict[str, str], relayed: set[str]) -> None:
        """Peers' endpoints as their latest records announce them (peer id -> endpoint), and which of them are
        relayed. A call for a peer goes there, whatever endpoint the caller read earlier: a member behind NAT
        that changed relays is reached at its new relay within the round that saw it move."""
        with self._lock:
            self._announced = dict(announced)
            self._relayed = set(relayed)

    def stub(self, endpoint: str, *, receiver: str) -> StageStub | EmulatedStub:
        """Calls to `endpoint`, tagged for `receiver`: the peer id its signed record gives, or UNBOUND (Ping, Info)."""
        with self._lock:
            if self.closed:
                raise ClientsClosed()
            endpoint = self._announced.get(receiver, endpoint)
            if (endpoint, receiver) not in self._stubs:
                meter = self.meter if receiver == UNBOUND else self.traffic.meter_for(receiver, self.meter)
                stub = StageStub(bound(self._channel(endpoint), self.auth, receiver), meter)
                self._stubs[endpoint, receiver] = stub if self.emulator is None else EmulatedStub(
                    stub, STAGE_SERVICE, self.emulator, endpoint)
            return self._stubs[endpoint, receiver]

    def moved(self, peer: str, endpoint: str, within_s: float, recheck_s: float = 0.1) -> bool:
        """Whether `peer`'s latest record announces another endpoint than `endpoint`, or, when the peer is
        relayed, does within `within_s`: a relayed peer that did not answer may have moved to another relay
        rather than died (the heartbeat reads records every --heartbeat-interval)."""
        deadline = time.monotonic() + within_s
        while True:
            with self._lock:
                if self.closed:
                    return False
                if self._announced.get(peer, endpoint) != endpoint:
                    return True
                if peer not in self._relayed:
                    return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(recheck_s)

    def relayed(self, peer: str) -> bool:
        with self._lock:
            return peer in self._relayed

    def relay(self, endpoint: str, *, receiver: str) -> RelayStub:
        """The relay service of the member at `endpoint` (node/relay/), on the same connection as its hops."""
        with self._lock:
            if self.closed:
                raise ClientsClosed()
            return RelayStub(bound(self._channel(endpoint), self.auth, receiver), self.meter)

    def _channel(self, endpoint: str) -> grpc.Channel:
        """The one connection to `endpoint` (under the lock)."""
        if endpoint not in self._channels:
            self._channels[endpoint] = dial(endpoint, channel_options(self.limits), None, self.tls, UNBOUND)[0]
        return self._channels[endpoint]

    def frame_signer(self, method: str):
        """What tags a Forward or Backward in a private swarm (None in a public one)."""
        if self.auth is None:
            return None
        return lambda env, meta, data: self.auth.sign_frames(method, env, meta, data)

    def fetch_state(self, endpoint: str, swarm: str, stage: int, min_round: int = -1, include_grads: bool = False,
                    *, receiver: str, timeout: float) -> tuple[int, dict[str, torch.Tensor], dict[str, str]]:
        request = pb.StateRequest(swarm_id=swarm, stage=stage, include_grads=include_grads, min_round=min_round)
        return decode_state(self.stub(endpoint, receiver=receiver).FetchState(request, timeout=timeout))

    def ping(self, endpoint: str, timeout: float, peer: str = "") -> None:
        """Returns once the node at `endpoint` answered a Ping; grpc.RpcError when it did not within `timeout`.
        Unbound: whoever answers at `endpoint` (a dial-back knows no peer id); `peer`, when known, is pinged
        where its latest record says (see `follow`)."""
        with self._lock:
            endpoint = self._announced.get(peer, endpoint) if peer else endpoint
        self.stub(endpoint, receiver=UNBOUND).Ping(pb.PingRequest(), timeout=timeout)

    def probe(self, endpoint: str, timeout: float) -> None:
        """Ping `endpoint` over a channel of its own, closed after: a dial-back must try to connect now, not fail
        at once because a cached channel to that address is waiting out its reconnect backoff."""
        with self._lock:
            if self.closed:
                raise ClientsClosed()
        raw, channel = dial(endpoint, channel_options(self.limits), self.auth, self.tls, UNBOUND)
        try:
            StageStub(channel, self.meter).Ping(pb.PingRequest(), timeout=timeout)
        finally:
            raw.close()

    def answering(self, endpoints: dict[str, str], timeout: float, workers: int) -> set[str]:
        """The peers (of peer id -> endpoint) that answer a Ping within `timeout` seconds, pinged in parallel."""
        def answers(peer: str, endpoint: str) -> bool:
            try:
                self.ping(endpoint, timeout, peer)
                return True
            except grpc.RpcError:
                return False
        if not endpoints:
            return set()
        with ThreadPoolExecutor(max_workers=min(workers, len(endpoints)), thread_name_prefix="ping") as pool:
            alive = list(pool.map(answers, endpoints, endpoints.values()))
        return {peer for peer, ok in zip(endpoints, alive) if ok}

    def close(self) -> None:
        """Close every channel, which ends the calls in flight on them (how a stopping node stops waiting)."""
        with self._lock:
            self.closed = True
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            self._stubs.clear()


class HopSender:
    """Sends each finished hop to the next peer in its path without blocking the compute thread."""

    def __init__(self, peer_id: str, clients: StageClients, metrics: NodeMetrics, local: LocalAccept,
                 on_give_up: GiveUp, deadline_s: float, unreachable_patience_s: float, workers: int, recheck_s: float,
                 retry_s: tuple[float, float], move_wait_s: float,
                 on_sent: Callable[[str, int, float], None] | None = None):
        """`retry_s`: the first and the longest wait between tries of a send the receiver refused for now;
        `move_wait_s`: how long a relayed receiver that stopped answering may take to announce another relay."""
        self.peer_id = peer_id
        self.retry_s = retry_s
        self.unreachable_patience_s = unreachable_patience_s  # unreachable this long: the peer is gone
        self.move_wait_s = move_wait_s
        self.clients = clients
        self.metrics = metrics
        self.local = local
        self.on_give_up = on_give_up
        self.deadline_s = deadline_s
        self.recheck_s = recheck_s
        self.on_sent = on_sent  # (peer id, bytes, seconds) of each delivered send: node/control/links.py measures links
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="send")
        self._closed = threading.Event()
        self._pending = 0  # sends submitted and not finished (delivered or given up)
        self._idle = threading.Condition()

    def __call__(self, kind: str, env: pb.Envelope, tensor: torch.Tensor) -> None:
        with self._idle:
            self._pending += 1
        self._pool.submit(self._tracked, kind, env, tensor)

    def _tracked(self, kind: str, env: pb.Envelope, tensor: torch.Tensor) -> None:
        try:
            self._deliver(kind, env, tensor)
        finally:
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float, stop: threading.Event) -> bool:
        """Wait until every send so far is delivered or given up (a node's last round ends with gradients
        still on their way to the previous hops); False on timeout or stop."""
        return wait_until(self._idle, lambda: not self._pending, timeout, self.recheck_s, stop.is_set)

    def close(self) -> None:
        self._closed.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _deliver(self, kind: str, env: pb.Envelope, tensor: torch.Tensor) -> None:
        target = env.path[env.hop]
        method = "Forward" if kind == "forward" else "Backward"
        started = time.monotonic()
        deadline = started + self.deadline_s
        backoff, longest = self.retry_s
        while not self._closed.is_set():
            try:
                if target.peer_id == self.peer_id:
                    self.local(kind, env, tensor)
                else:
                    self._rpc(method, target, env, tensor)
                return
            except (ProtocolError, grpc.RpcError) as e:
                code = e.code if isinstance(e, ProtocolError) else e.code()
                reason = e.reason if isinstance(e, ProtocolError) else e.details()
                if self.clients.closed:  # we are stopping: not the receiver's failure
                    return
                self.metrics.rpc_errors.labels(method=method, code=code.name).inc()
                gone = code == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started > self.unreachable_patience_s
                if gone and self.clients.moved(target.peer_id, target.endpoint, self.move_wait_s):
                    gone, started = False, time.monotonic()  # it moved to another relay: `stub` dials it there
                if code not in RETRYABLE or gone or time.monotonic() + backoff > deadline:
                    log.warning("%s of round %d microbatch %d to hop %d (%s) failed: %s %s", method, env.round,
                                env.microbatch, env.hop, target.peer_id[-8:], code.name, reason)
                    self.on_give_up(env, code, reason)
                    return
                log.debug("%s of round %d microbatch %d attempt %d to hop %d: %s %s; again in %.2f s", method,
                          env.round, env.microbatch, env.attempt, env.hop, code.name, reason, backoff)
                self._closed.wait(backoff)
                backoff = min(backoff * 2, longest)
            except Exception as e:  # a bug or a broken tensor: report it rather than lose the thread
                log.exception("%s to hop %d failed", method, env.hop)
                self.on_give_up(env, None, repr(e))
                return

    def _rpc(self, method: str, target, env: pb.Envelope, tensor: torch.Tensor) -> None:
        stub = self.clients.stub(target.endpoint, receiver=target.peer_id)  # frames name it in their own tag
        call = stub.Forward if method == "Forward" else stub.Backward
        codec = self.clients.codecs.for_hop(env.round, "forward" if method == "Forward" else "backward")
        sizes: list[int] = []
        frames = (sizes.append(len(f)) or f for f in encode_frames(env, tensor, self.clients.limits,
                                                                   self.clients.frame_signer(method), codec=codec))
        started = time.perf_counter()
        receipt = call(frames, timeout=self.deadline_s)
        elapsed = time.perf_counter() - started
        self.metrics.rpc_seconds.labels(method=method, side="client").observe(elapsed)
        direction = "forward" if method == "Forward" else "backward"
        tokens = receipt_tokens(receipt, tensor)
        if tokens is None:  # an older receiver says nothing; a hostile one may say anything: neither is counted
            self.metrics.receipts_refused.inc()
        else:
            self.metrics.hops_acknowledged.labels(direction=direction).inc()
            self.metrics.tokens_acknowledged.labels(direction=direction).inc(tokens)
        if self.on_sent is not None:
            self.on_sent(target.peer_id, sum(sizes), elapsed)
