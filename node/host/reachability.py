"""Can the swarm reach this node, and how? A peer found through the DHT dials back the caller.

At start (and every --reachability-recheck seconds after) a node that joined a swarm asks one serving
stage member (`CheckReachability`) to Ping its gRPC port and to open a TCP connection to each announced DHT
multiaddr. The member dials the port at the address the call came from, never anywhere else, so nobody can
use it to probe third parties, and a node behind NAT (which announces an address nobody outside sees) is
told the address it was seen at. The answer gives the node its class (`protocol.records.Reach`): `direct`
when the dial-back worked, `unreachable` when it did not; `unchecked` when nobody could be asked. The node
prints one line naming the port to forward or the flag to set, as Petals does.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import grpc

from node.dataplane.transport import StageClients
from protocol.errors import ProtocolError
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.records import NodeRecord, Reach

log = logging.getLogger(__name__)


# ---- the member's side ---------------------------------------------------------------------------------------------
def dial_back(request: pb.ReachabilityRequest, caller: str, clients: StageClients,
              probe_timeout: float) -> pb.ReachabilityReply:
    """Dial the caller's port at its own address (and its announced DHT addresses there), each given
    `probe_timeout` seconds to answer; `caller` is gRPC's peer string ('ipv4:1.2.3.4:5678')."""
    caller_host = _host_of_peer(caller)
    port = request.endpoint.rpartition(":")[2]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, f"no port to dial back in {request.endpoint!r}")
    target = f"[{caller_host}]:{port}" if ":" in caller_host else f"{caller_host}:{port}"
    problems = []
    try:
        clients.probe(target, probe_timeout)
        grpc_ok = True
    except grpc.RpcError as e:
        grpc_ok = e.code() != grpc.StatusCode.UNAVAILABLE and e.code() != grpc.StatusCode.DEADLINE_EXCEEDED
        if not grpc_ok:
            problems.append(f"gRPC {target}: {_why(e)}")
    dht_ok = True
    for maddr in list(request.maddrs)[:8]:
        dht_target = _tcp_target(maddr)
        if dht_target is None or dht_target[0] != caller_host:
            continue
        try:
            socket.create_connection(dht_target, timeout=probe_timeout).close()
        except OSError as e:
            dht_ok = False
            problems.append(f"DHT {maddr}: {e.strerror or e}")
    return pb.ReachabilityReply(grpc_reachable=grpc_ok, dht_reachable=dht_ok, detail="; ".join(problems),
                                observed_host=caller_host)


def _why(e: grpc.RpcError) -> str:
    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "connection timed out"
    return "connection refused or failed" if e.code() == grpc.StatusCode.UNAVAILABLE else e.code().name


# ---- the starting node's side --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reachability:
    """What the last check found: the node's class, whether all is well, and the line that says what to do."""

    reach: Reach
    ok: bool
    message: str  # what was found and what to do about it
    endpoint: str = ""  # where the member reached us, when that is not the announced endpoint
    finding: str = ""  # what was found, without the advice (for lines that refer back to it)
    via: str = ""  # relayed: the relay member's peer id

    @property
    def why(self) -> str:
        return self.finding or self.message


NOT_CHECKED = Reachability(Reach.UNCHECKED, True, "reachability not checked yet")


def self_check(members: dict[str, NodeRecord], me: str, endpoint: str, maddrs: list[str],
               clients: StageClients, timeout: float, grpc_port_flag: str = "--port",
               dht_port_flag: str = "--dht-port") -> Reachability:
    """Ask a serving stage member to dial this node back, waiting `timeout` seconds for its answer."""
    others = {p: r for p, r in members.items() if p != me}
    if not others:  # we joined through --initial-peers, yet see nobody: the wrong swarm id or key
        return Reachability(Reach.UNCHECKED, False,
                            "no member of the swarm is visible through --initial-peers, so nobody can dial this node "
                            "back: check --swarm and, for a private swarm, --swarm-key")
    # Stage nodes dial back; not a relayed one: our call would reach it through its relay, seemingly from its
    # own host, and its dial-back would find itself.
    peers = [r for _, r in sorted(others.items()) if r.plannable and r.role != "expert" and r.reach is not Reach.RELAYED]
    if not peers:
        return Reachability(Reach.UNCHECKED, True, "no serving member to check reachability with yet")
    peer = peers[0]
    try:
        reply = clients.stub(peer.endpoint, receiver=peer.peer_id).CheckReachability(
            pb.ReachabilityRequest(endpoint=endpoint, maddrs=maddrs), timeout=timeout)
    except grpc.RpcError as e:
        hint = " (is --swarm-key the swarm's key?)" if e.code() == grpc.StatusCode.UNAUTHENTICATED else ""
        return Reachability(Reach.UNCHECKED, False, f"could not run the reachability check with {peer.endpoint}: "
                                                    f"{e.code().name} {e.details()}{hint}")
    announced_host, _, port = endpoint.rpartition(":")
    seen = reply.observed_host or announced_host.strip("[]")  # an older member dialed the announced host
    seen_at = f"[{seen}]:{port}" if ":" in seen else f"{seen}:{port}"
    member = peer.endpoint.rpartition(":")[0]
    if not reply.grpc_reachable:
        finding = f"not reachable at {seen_at} from {member} ({_first_reason(reply.detail)})"
        return Reachability(Reach.UNREACHABLE, False,
                            f"{finding}: forward TCP port {port} ({grpc_port_flag}) to this host, or set "
                            f"--announce-host/--announce-port to an address peers can dial; until then this node "
                            f"gets no work", finding=finding)
    moved = seen_at if seen != announced_host.strip("[]") else ""
    if not reply.dht_reachable:
        dht_port = next((t[1] for t in map(_tcp_target, maddrs) if t), "?")
        return Reachability(Reach.DIRECT, False,
                            f"peers cannot reach this node's DHT: open TCP port {dht_port} ({dht_port_flag}) in your "
                            f"firewall or forward it through your NAT, or set --announce-host to the address peers "
                            f"can reach [{reply.detail}]", moved)
    return Reachability(Reach.DIRECT, True, f"reachable: {peer.peer_id[-8:]} dialed {seen_at} and the DHT back",
                        moved)


def _first_reason(detail: str) -> str:
    """'gRPC 1.2.3.4:5: connection timed out; DHT ...' -> 'connection timed out'."""
    return detail.split("; ", 1)[0].split(": ", 1)[-1] or "no answer"


def _host_of_peer(peer: str) -> str:
    """'ipv4:1.2.3.4:5678' -> '1.2.3.4'; 'ipv6:[::1]:5678' -> '::1'."""
    address = peer.split(":", 1)[1] if peer.startswith(("ipv4:", "ipv6:")) else peer
    return address.rpartition(":")[0].strip("[]")


def _tcp_target(maddr: str) -> tuple[str, int] | None:
    parts = maddr.strip("/").split("/")
    if len(parts) >= 4 and parts[0] in ("ip4", "ip6") and parts[2] == "tcp" and parts[3].isdigit():
        return parts[1], int(parts[3])
    return None
