"""The attached member's side: a node nobody can dial keeps one Attach call open to a relay member.

The relay is chosen by rendezvous hashing over the members that peers can dial, so that the members behind
NAT spread over the relays and each keeps its relay while the swarm changes. On the call's first event the
node announces the relay's endpoint for it (`on_attached`); for each connection the relay names, it dials
the relay's tunnel port, presents the number and token, and splices that connection to its own gRPC server.
When the call ends (the relay stopped, died or refused), the node says so (`on_detached`), ranks that relay
last for FAILED_RELAY_PAUSE_S and attaches to the next one at once (to the same one after a second, when it
is the only one).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable

import grpc

from node.config import RelayConfig
from node.dataplane.transport import StageClients
from node.relay.server import PREAMBLE
from node.relay.splice import RateLimit, Splice, close_quietly
from protocol.generated.swarm.v1 import relay_pb2 as pb
from protocol.records import NodeRecord, Reach

log = logging.getLogger(__name__)

FAILED_RELAY_PAUSE_S = 30.0  # a relay that dropped or refused us is tried after the others this long
NO_RELAY_RECHECK_S = 1.0  # while no member can relay, look again this often
_NO_LIMIT = RateLimit(0)


class RelayTunnel:
    def __init__(self, me: str, swarm: str, members: Callable[[], dict[str, NodeRecord]], clients: StageClients,
                 local_target: str, config: RelayConfig, stop: threading.Event,
                 on_attached: Callable[[str, str], None], on_detached: Callable[[str], None]):
        """`local_target`: host:port of this node's own gRPC server; `on_attached(endpoint, relay peer id)`,
        `on_detached(why)`."""
        self.me = me
        self.swarm = swarm
        self.members = members
        self.clients = clients
        self.local_target = local_target
        self.config = config
        self.on_attached = on_attached
        self.on_detached = on_detached
        self._stop = threading.Event()
        self._node_stop = stop
        self._paused: dict[str, float] = {}  # relay peer id -> monotonic time it may be tried again
        self._call: grpc.Future | None = None
        self._splices: set[Splice] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="relay-tunnel", daemon=True)

    @classmethod
    def create(cls, *args, **kwargs) -> "RelayTunnel":
        tunnel = cls(*args, **kwargs)
        tunnel._thread.start()
        return tunnel

    @property
    def stopped(self) -> bool:
        return self._stop.is_set() or self._node_stop.is_set()

    def _run(self) -> None:
        while not self.stopped:
            relay = self._choose()
            if relay is None or self._paused.get(relay.peer_id, 0.0) > time.monotonic():
                self._stop.wait(NO_RELAY_RECHECK_S)  # none, or only relays that failed us lately: not in a loop
            if relay is None or self.stopped:
                continue
            why = self._attach(relay)
            self._paused[relay.peer_id] = time.monotonic() + FAILED_RELAY_PAUSE_S
            if why and not self.stopped:
                log.info("relay %s: %s; trying another", relay.peer_id[-8:], why)

    def _choose(self) -> NodeRecord | None:
        """The member peers can dial that ranks first for us (rendezvous hashing); one that failed us lately
        only when all have, the one whose pause ends first."""
        try:
            members = self.members()
        except Exception as e:  # the DHT is closing; the loop looks again
            log.debug("no members to choose a relay from: %r", e)
            return None
        candidates = [r for p, r in members.items() if p != self.me and r.serving and r.role != "expert"
                      and r.reach in (Reach.DIRECT, Reach.UNCHECKED)]
        if not candidates:
            return None
        now = time.monotonic()
        return min(candidates, key=lambda r: (max(0.0, self._paused.get(r.peer_id, 0.0) - now),
                                              hashlib.sha256(f"{self.me}/{r.peer_id}".encode()).digest()))

    def _attach(self, relay: NodeRecord) -> str:
        """One attachment, for as long as it lasts; returns why it ended ("" when we stopped)."""
        attached = False
        call = self.clients.relay(relay.endpoint, receiver=relay.peer_id).Attach(
            pb.AttachRequest(swarm_id=self.swarm, peer_id=self.me))
        with self._lock:
            self._call = call
        if self.stopped:
            call.cancel()
        # A relay that never answers must not hold us: its first event comes within --relay-tunnel-timeout.
        give_up = threading.Timer(self.config.tunnel_timeout, lambda: attached or call.cancel())
        give_up.start()
        try:
            first = next(call)
            attached = True
            give_up.cancel()
            tunnel = first.tunnel
            self.on_attached(first.endpoint, relay.peer_id)
            for event in call:
                threading.Thread(target=self._take, args=(tunnel, event), name="relay-take", daemon=True).start()
            why = "the relay ended the attachment"
        except grpc.RpcError as e:
            why = "" if self.stopped else f"{e.code().name} {e.details()}"
        except StopIteration:
            why = "the relay closed the call"
        finally:
            give_up.cancel()
            with self._lock:
                self._call = None
                splices = list(self._splices)
            for splice in splices:
                splice.close()
        if attached and not self._stop.is_set():  # closed by its owner (directly reachable now): no news
            self.on_detached(why or "this node is stopping")
        return why

    def _take(self, tunnel: str, event: pb.RelayEvent) -> None:
        """Dial the relay's tunnel port for one connection, present it, and splice it to our own server."""
        host, _, port = tunnel.rpartition(":")
        try:
            relayed = socket.create_connection((host.strip("[]"), int(port)), timeout=self.config.tunnel_timeout)
        except (OSError, ValueError) as e:
            log.debug("could not dial the relay's tunnel %s: %r", tunnel, e)
            return
        try:
            relayed.sendall(PREAMBLE.pack(event.connection, event.token))
            host, _, port = self.local_target.rpartition(":")
            local = socket.create_connection((host, int(port)), timeout=self.config.tunnel_timeout)
        except OSError as e:
            log.debug("relayed connection %d lost: %r", event.connection, e)
            close_quietly(relayed)
            return
        relayed.settimeout(None)
        local.settimeout(None)
        splice = Splice(relayed, local, _NO_LIMIT, on_closed=self._forget)
        with self._lock:
            self._splices.add(splice)

    def _forget(self, splice: Splice) -> None:
        with self._lock:
            self._splices.discard(splice)

    def close(self) -> None:
        """Detach (end the call, close the relayed connections) and stop looking for a relay."""
        self._stop.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(timeout=self.config.tunnel_timeout)
