"""Can the swarm reach this node? A peer found through the DHT dials back the announced endpoints.

At start, a node joining a swarm asks one serving member (`CheckReachability`) to Ping its announced
gRPC endpoint and to open a TCP connection to each announced DHT multiaddr. If either fails, the node
prints one message naming the port to open or the flag to set, as Petals does. The member dials only
the caller's own address, so nobody can use it to probe third parties.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import grpc

from node.dataplane.transport import StageClients
from protocol.errors import ProtocolError
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.records import NodeRecord

log = logging.getLogger(__name__)


# ---- the member's side ---------------------------------------------------------------------------------------------
def dial_back(request: pb.ReachabilityRequest, caller: str, clients: StageClients,
              probe_timeout: float) -> pb.ReachabilityReply:
    """Dial the caller's announced endpoints, each given `probe_timeout` seconds to answer; `caller` is gRPC's
    peer string ('ipv4:1.2.3.4:5678')."""
    caller_host = _host_of_peer(caller)
    host, _, port = request.endpoint.rpartition(":")
    if host.strip("[]") != caller_host or not port.isdigit():
        raise ProtocolError(grpc.StatusCode.PERMISSION_DENIED,
                            f"a node only dials back its caller: {request.endpoint!r} is not at {caller_host}")
    problems = []
    try:
        clients.ping(request.endpoint, probe_timeout)
        grpc_ok = True
    except grpc.RpcError as e:
        grpc_ok = e.code() != grpc.StatusCode.UNAVAILABLE and e.code() != grpc.StatusCode.DEADLINE_EXCEEDED
        if not grpc_ok:
            problems.append(f"gRPC {request.endpoint}: {e.code().name}")
    dht_ok = True
    for maddr in list(request.maddrs)[:8]:
        target = _tcp_target(maddr)
        if target is None or target[0] != caller_host:
            continue
        try:
            socket.create_connection(target, timeout=probe_timeout).close()
        except OSError as e:
            dht_ok = False
            problems.append(f"DHT {maddr}: {e.strerror or e}")
    return pb.ReachabilityReply(grpc_reachable=grpc_ok, dht_reachable=dht_ok, detail="; ".join(problems))


# ---- the starting node's side --------------------------------------------------------------------------------------
@dataclass
class Reachability:
    ok: bool
    message: str


def self_check(members: dict[str, NodeRecord], me: str, endpoint: str, maddrs: list[str],
               clients: StageClients, timeout: float, grpc_port_flag: str = "--port",
               dht_port_flag: str = "--dht-port") -> Reachability:
    """Ask a serving member to dial this node back, waiting `timeout` seconds for its answer."""
    others = {p: r for p, r in members.items() if p != me}
    if not others:  # we joined through --initial-peers, yet see nobody: the wrong swarm id or key
        return Reachability(False, "no member of the swarm is visible through --initial-peers, so nobody can dial "
                                   "this node back: check --swarm and, for a private swarm, --swarm-key")
    peers = [r for _, r in sorted(others.items()) if r.serving]
    if not peers:
        return Reachability(True, "no serving member to check reachability with yet")
    peer = peers[0]
    try:
        reply = clients.stub(peer.endpoint, receiver=peer.peer_id).CheckReachability(
            pb.ReachabilityRequest(endpoint=endpoint, maddrs=maddrs), timeout=timeout)
    except grpc.RpcError as e:
        hint = " (is --swarm-key the swarm's key?)" if e.code() == grpc.StatusCode.UNAUTHENTICATED else ""
        return Reachability(False, f"could not run the reachability check with {peer.endpoint}: "
                                   f"{e.code().name} {e.details()}{hint}")
    if reply.grpc_reachable and reply.dht_reachable:
        return Reachability(True, f"reachable: {peer.peer_id[-8:]} dialed {endpoint} and the DHT back")
    port = endpoint.rpartition(":")[2]
    if not reply.grpc_reachable:
        fix = (f"peers cannot reach this node's gRPC endpoint {endpoint}: open TCP port {port} ({grpc_port_flag}) "
               f"in your firewall or forward it through your NAT, or set --announce-host/--announce-port to the "
               f"address peers can reach")
    else:
        dht_port = next((t[1] for t in map(_tcp_target, maddrs) if t), "?")
        fix = (f"peers cannot reach this node's DHT: open TCP port {dht_port} ({dht_port_flag}) in your firewall "
               f"or forward it through your NAT, or set --announce-host to the address peers can reach")
    return Reachability(False, f"{fix} [{reply.detail}]")


def _host_of_peer(peer: str) -> str:
    """'ipv4:1.2.3.4:5678' -> '1.2.3.4'; 'ipv6:[::1]:5678' -> '::1'."""
    address = peer.split(":", 1)[1] if peer.startswith(("ipv4:", "ipv6:")) else peer
    return address.rpartition(":")[0].strip("[]")


def _tcp_target(maddr: str) -> tuple[str, int] | None:
    parts = maddr.strip("/").split("/")
    if len(parts) >= 4 and parts[0] in ("ip4", "ip6") and parts[2] == "tcp" and parts[3].isdigit():
        return parts[1], int(parts[3])
    return None
