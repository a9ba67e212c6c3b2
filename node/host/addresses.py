"""The address a node announces: one peers can dial, never the wildcard it may listen on.

A node serving on `--host 0.0.0.0` used to announce `0.0.0.0:<port>`, which nobody can dial. Unless the
operator says (`--announce-host`), the node announces the address its own connections to the swarm leave
from: the source address the kernel picks for the route to an initial peer (a UDP `connect` sends nothing).
Behind NAT that is still a private address; the reachability check (node/host/reachability.py) then says
where peers actually see the node, and whether they can dial it there.
"""

from __future__ import annotations

import ipaddress
import socket

WILDCARDS = ("", "0.0.0.0", "::", "[::]")
_ANY_PUBLIC = "192.0.2.1"  # TEST-NET-1: only used to ask the kernel which source the default route takes


def announced_host(bind_host: str, announce_host: str, initial_peers: list[str]) -> str:
    """--announce-host when set; else the bind address unless it is a wildcard; else the source address of
    the route to the first initial peer (or of the default route for a new swarm); loopback as a last resort."""
    if announce_host:
        return announce_host
    if bind_host not in WILDCARDS:
        return bind_host
    targets = [host for host in map(_maddr_host, initial_peers) if host] + [_ANY_PUBLIC]
    for target in targets:
        source = _route_source(target)
        if source:
            return source
    return "127.0.0.1"


def _maddr_host(maddr: str) -> str | None:
    """'/ip4/10.0.0.1/tcp/5/p2p/Qm...' -> '10.0.0.1' (ip4 only: the gRPC server binds IPv4 here)."""
    parts = maddr.strip("/").split("/")
    if len(parts) >= 2 and parts[0] == "ip4":
        try:
            ipaddress.IPv4Address(parts[1])
        except ValueError:
            return None
        return parts[1]
    return None


def _route_source(target: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((target, 9))  # no packet leaves: connect on UDP only picks the route
        except OSError:  # no route there
            return None
        source = probe.getsockname()[0]
    return None if source in WILDCARDS else source
