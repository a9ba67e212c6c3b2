"""The relay's side: members behind NAT attach, and peers reach them through a port of ours.

Each attached member gets a listening port of its own (the endpoint it announces). A peer connects there;
we name the connection on the member's Attach call (a number and a random token), the member dials our
tunnel port and presents both, and we splice the two connections. We never parse what crosses: the gRPC
connection inside runs end to end, with its TLS and auth tags, so a relay learns no more than a member
and can do no more than drop bytes. Limits: --relay-nodes attachments, --relay-connections per member,
--relay-limit MiB/s for all splices together; a connection the member does not take within
--relay-tunnel-timeout is closed.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import queue
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc

from node.config import RelayConfig
from node.host.metrics import NodeMetrics
from node.relay.splice import RateLimit, Splice, close_quietly
from protocol.errors import ProtocolError, check_swarm
from protocol.generated.swarm.v1 import relay_pb2 as pb

log = logging.getLogger(__name__)

PREAMBLE = struct.Struct(">Q32s")  # what a member writes first on a tunnel connection: number, token
MIB = 1024 * 1024


@dataclass
class _Waiting:
    """A peer's connection, named to its member and not taken yet."""

    sock: socket.socket
    token: bytes
    attachment: "_Attachment"
    deadline: float


@dataclass(eq=False)
class _Attachment:
    peer: str  # what the member called itself (log only)
    listener: socket.socket
    events: "queue.Queue[pb.RelayEvent | None]" = field(default_factory=queue.Queue)
    splices: set[Splice] = field(default_factory=set)

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]


class RelayServer:
    def __init__(self, config: RelayConfig, bind_host: str, announce_host: str, swarm: str, metrics: NodeMetrics,
                 recheck_s: float, reachable: Callable[[], bool] = lambda: True):
        """`reachable`: whether peers can dial this node itself now (a node behind NAT relays for nobody)."""
        self.config = config
        self.reachable = reachable
        self.bind_host = bind_host
        self.announce_host = announce_host
        self.swarm = swarm
        self.metrics = metrics
        self.recheck_s = recheck_s
        self.limit = RateLimit(config.limit * MIB)
        self._attachments: set[_Attachment] = set()
        self._waiting: dict[int, _Waiting] = {}
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.tunnel: socket.socket | None = None  # opened with the first attachment: a node nobody uses as a
        # relay listens on no extra port

    @classmethod
    def create(cls, config: RelayConfig, bind_host: str, announce_host: str, swarm: str, metrics: NodeMetrics,
               recheck_s: float, reachable: Callable[[], bool] = lambda: True) -> "RelayServer":
        """A relay that opens its tunnel port (--relay-port) when the first member attaches."""
        return cls(config, bind_host, announce_host, swarm, metrics, recheck_s, reachable)

    def _open_tunnel(self) -> None:
        """Listen on the tunnel port and take members' tunnel connections there (under the lock)."""
        if self.tunnel is not None:
            return
        try:
            self.tunnel = socket.create_server((self.bind_host, self.config.port))
        except OSError as e:
            raise ProtocolError(grpc.StatusCode.UNAVAILABLE, f"cannot open the relay's tunnel port: {e.strerror}")
        self.tunnel.settimeout(self.recheck_s)
        threading.Thread(target=self._take_tunnels, name="relay-tunnel", daemon=True).start()

    @property
    def tunnel_endpoint(self) -> str:
        return f"{self.announce_host}:{self.tunnel.getsockname()[1]}"

    # ---- Attach ----------------------------------------------------------------------------------------------------
    def Attach(self, request: pb.AttachRequest, context: grpc.ServicerContext) -> Iterator[pb.RelayEvent]:
        try:
            check_swarm(request.swarm_id, self.swarm)
        except ProtocolError:
            self.metrics.relay_refused.labels("swarm").inc()
            raise
        if not self.reachable():
            self.metrics.relay_refused.labels("unreachable").inc()
            raise ProtocolError(grpc.StatusCode.UNAVAILABLE, "this node is not directly reachable itself")
        attachment = self._attach(request.peer_id[-64:])
        log.info("relaying for %s at %s", attachment.peer[-8:], self._endpoint(attachment))
        threading.Thread(target=self._take_peers, args=(attachment,), name="relay-accept", daemon=True).start()
        try:
            yield pb.RelayEvent(endpoint=self._endpoint(attachment), tunnel=self.tunnel_endpoint)
            while context.is_active() and not self._closed.is_set():
                try:
                    event = attachment.events.get(timeout=self.recheck_s)
                except queue.Empty:
                    continue
                if event is None:
                    break
                yield event
        finally:
            self._detach(attachment)
            log.info("stopped relaying for %s", attachment.peer[-8:])

    def _endpoint(self, attachment: _Attachment) -> str:
        return f"{self.announce_host}:{attachment.port}"

    def _attach(self, peer: str) -> _Attachment:
        with self._lock:
            if len(self._attachments) >= self.config.nodes:
                self.metrics.relay_refused.labels("full").inc()
                raise ProtocolError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"this relay carries {self.config.nodes} members already (--relay-nodes)")
            self._open_tunnel()
            attachment = _Attachment(peer, self._listen())
            self._attachments.add(attachment)
            self.metrics.relay_attached.set(len(self._attachments))
        return attachment

    def _listen(self) -> socket.socket:
        """A port for one member: the first free one after --relay-port (so that operators can forward a known
        range), or any free one when --relay-port is 0."""
        if not self.config.port:
            return socket.create_server((self.bind_host, 0))
        taken = {a.port for a in self._attachments}
        for port in range(self.config.port + 1, self.config.port + 1 + self.config.nodes):
            if port in taken:
                continue
            try:
                return socket.create_server((self.bind_host, port))
            except OSError:
                continue
        raise ProtocolError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"no free port in {self.config.port + 1}..{self.config.port + self.config.nodes}")

    def _detach(self, attachment: _Attachment) -> None:
        with self._lock:
            self._attachments.discard(attachment)
            self.metrics.relay_attached.set(len(self._attachments))
            waiting = [n for n, w in self._waiting.items() if w.attachment is attachment]
            dropped = [self._waiting.pop(n).sock for n in waiting]
            splices = list(attachment.splices)
        close_quietly(attachment.listener)
        for sock in dropped:
            close_quietly(sock)
        for splice in splices:
            splice.close()

    # ---- peers' connections ----------------------------------------------------------------------------------------
    def _take_peers(self, attachment: _Attachment) -> None:
        """Accept peers' connections to one member's port and name each on its Attach call."""
        while not self._closed.is_set():
            try:
                sock, _ = attachment.listener.accept()
            except OSError:  # the listener closed: the member detached
                return
            with self._lock:
                waiting = sum(1 for w in self._waiting.values() if w.attachment is attachment)
                if len(attachment.splices) + waiting >= self.config.connections:
                    self.metrics.relay_refused.labels("connections").inc()
                    close_quietly(sock)
                    continue
                number, token = next(self._numbers), secrets.token_bytes(32)
                self._waiting[number] = _Waiting(sock, token, attachment,
                                                 time.monotonic() + self.config.tunnel_timeout)
            attachment.events.put(pb.RelayEvent(connection=number, token=token))

    def _take_tunnels(self) -> None:
        """Accept members' tunnel connections; expire peers' connections nobody took."""
        while not self._closed.is_set():
            self._expire()
            try:
                sock, _ = self.tunnel.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._join, args=(sock,), name="relay-join", daemon=True).start()

    def _join(self, sock: socket.socket) -> None:
        """Read a tunnel connection's preamble and splice it to the peer's connection it names."""
        sock.settimeout(self.config.tunnel_timeout)
        try:
            preamble = _read_exactly(sock, PREAMBLE.size)
        except OSError:
            preamble = b""
        number, token = PREAMBLE.unpack(preamble) if len(preamble) == PREAMBLE.size else (0, b"")
        with self._lock:
            waiting = self._waiting.get(number)
            if waiting is None or not hmac.compare_digest(waiting.token, token):
                waiting = None
            else:
                del self._waiting[number]
        if waiting is None:
            self.metrics.relay_refused.labels("token").inc()
            close_quietly(sock)
            return
        sock.settimeout(None)
        attachment = waiting.attachment
        splice = Splice(waiting.sock, sock, self.limit, on_bytes=self.metrics.relayed_bytes.inc,
                        on_closed=lambda s: self._forget(attachment, s))
        with self._lock:
            attachment.splices.add(splice)
        if attachment not in self._attachments:  # detached meanwhile
            splice.close()

    def _forget(self, attachment: _Attachment, splice: Splice) -> None:
        with self._lock:
            attachment.splices.discard(splice)

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [n for n, w in self._waiting.items() if w.deadline < now]
            expired = [self._waiting.pop(n) for n in late]
        for w in expired:
            self.metrics.relay_refused.labels("expired").inc()
            close_quietly(w.sock)

    def close(self) -> None:
        """Stop relaying: end every Attach call, close every port and splice."""
        self._closed.set()
        with self._lock:
            if self.tunnel is not None:
                close_quietly(self.tunnel)
        with self._lock:
            attachments = list(self._attachments)
        for attachment in attachments:
            attachment.events.put(None)
            self._detach(attachment)


class NotARelay:
    """The relay service of a node started with --relay-limit 0: every Attach is refused, and counted."""

    def __init__(self, metrics: NodeMetrics):
        self.metrics = metrics

    def Attach(self, request: pb.AttachRequest, context: grpc.ServicerContext) -> Iterator[pb.RelayEvent]:
        self.metrics.relay_refused.labels("not_relay").inc()
        raise ProtocolError(grpc.StatusCode.UNAVAILABLE, "this node does not relay (--relay-limit 0)")
        yield  # a generator, as the streaming handler expects


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        piece = sock.recv(n - len(data))
        if not piece:
            break
        data += piece
    return data
