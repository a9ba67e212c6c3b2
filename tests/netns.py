"""A real NAT for tests: a home network behind a masquerading router, built from network namespaces.

    root namespace ("public")          router namespace                    home namespace
    <pub> 10.231.P.1/24  <--veth-->  wan 10.231.P.2/24
                                     lan 10.231.P+1.1/24  <--veth-->  eth 10.231.P+1.2/24, default via .1

The router masquerades what leaves `wan` (nftables `masquerade`), so public nodes see home's connections
come from 10.231.P.2, and it drops every inbound connection it did not see go out (to home and to itself:
no port is forwarded, and nothing answers with a reset). Public nodes listen on 10.231.P.1, an address of
a veth this harness made. P is drawn from the process id so that two test runs on one machine do not
share addresses; every name carries it too.

Needs root, `ip` and `nft`. `Nat.build()` raises NatUnavailable with one line saying what is missing, so
the tests that need it fail (never skip): CI has root and namespaces. Everything is removed on exit,
after a failed test too: processes left in the namespaces, the namespaces (with their veths and nft tables).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest


class NatUnavailable(RuntimeError):
    """This machine cannot build the NAT (no root, no `ip`/`nft`, or namespaces refused)."""


@dataclass(frozen=True)
class Nat:
    """The addresses and names of one built NAT."""

    tag: str  # in every name this harness creates
    public_ip: str  # where public nodes listen (root namespace)
    router_wan_ip: str  # what public nodes see home's connections come from
    home_ip: str  # the home host's own (private) address
    router: str  # namespace names
    home: str
    public_veth: str

    def home_cmd(self, *argv: str) -> list[str]:
        """`argv` run inside the home namespace."""
        return ["ip", "netns", "exec", self.home, *argv]

    def router_cmd(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.router, *argv]


def _slot() -> int:
    return os.getpid() % 100  # P = 2 * slot + 10 keeps 10.231.10.0 .. 10.231.209.0


def _run(argv: list[str], stdin: str | None = None) -> None:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if done.returncode:
        raise NatUnavailable(f"cannot build the test NAT: `{' '.join(argv)}` failed: "
                             f"{(done.stderr or done.stdout).strip().splitlines()[-1:] or done.returncode}")


def _router_rules(wan: str, lan: str) -> str:
    """Masquerade home's outgoing connections; admit only their replies, on the router and through it (and
    what `forward_port` forwards later)."""
    return f"""
table ip swarm_nat {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{wan}" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        ct status dnat accept
        iifname "{lan}" oifname "{wan}" accept
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{wan}" ct state established,related accept
        iifname "{wan}" drop
    }}
}}
"""


def check_available() -> None:
    """Raise NatUnavailable with one line when this machine cannot build the NAT."""
    if os.geteuid() != 0:
        raise NatUnavailable("the NAT tests need root (network namespaces and nftables); run them as root")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            raise NatUnavailable(f"the NAT tests need `{tool}`: install {package} (scripts/test.sh does, as root)")


def build() -> Nat:
    """Create the namespaces, veths, addresses, routes and nft rules; on failure, remove what was made."""
    check_available()
    slot, pid = _slot(), os.getpid()
    p = 2 * slot + 10
    nat = Nat(tag=str(pid), public_ip=f"10.231.{p}.1", router_wan_ip=f"10.231.{p}.2",
              home_ip=f"10.231.{p + 1}.2", router=f"swn-router-{pid}", home=f"swn-home-{pid}",
              public_veth=f"swnp{pid}"[:15])
    wan, lan, eth = "wan0", "lan0", "eth0"
    try:
        _run(["ip", "netns", "add", nat.router])
        _run(["ip", "netns", "add", nat.home])
        # public <-> router: made in the root namespace, one end moved into the router
        _run(["ip", "link", "add", nat.public_veth, "type", "veth", "peer", "name", f"swnw{pid}"[:15]])
        _run(["ip", "link", "set", f"swnw{pid}"[:15], "netns", nat.router, "name", wan])
        _run(["ip", "addr", "add", f"{nat.public_ip}/24", "dev", nat.public_veth])
        _run(["ip", "link", "set", nat.public_veth, "up"])
        # a route to home through the router, so a test can show the router drops what is forwarded too
        _run(["ip", "route", "add", f"10.231.{p + 1}.0/24", "via", nat.router_wan_ip, "dev", nat.public_veth,
              "onlink"])
        # router <-> home: made in the router, one end moved into home
        _run(nat.router_cmd("ip", "link", "add", lan, "type", "veth", "peer", "name", eth))
        _run(nat.router_cmd("ip", "link", "set", eth, "netns", nat.home))
        _run(nat.router_cmd("ip", "addr", "add", f"{nat.router_wan_ip}/24", "dev", wan))
        _run(nat.router_cmd("ip", "addr", "add", f"10.231.{p + 1}.1/24", "dev", lan))
        for dev in ("lo", wan, lan):
            _run(nat.router_cmd("ip", "link", "set", dev, "up"))
        _run(nat.home_cmd("ip", "addr", "add", f"{nat.home_ip}/24", "dev", eth))
        for dev in ("lo", eth):
            _run(nat.home_cmd("ip", "link", "set", dev, "up"))
        _run(nat.home_cmd("ip", "route", "add", "default", "via", f"10.231.{p + 1}.1"))
        _run(nat.router_cmd("sysctl", "-qw", "net.ipv4.ip_forward=1"))
        _run(nat.router_cmd("nft", "-f", "-"), stdin=_router_rules(wan, lan))
    except BaseException:
        teardown(nat)
        raise
    return nat


def forward_port(nat: Nat, port: int) -> None:
    """What an operator does on a home router: forward TCP `port` of its public address to the home host, from
    outside and from home too (NAT loopback: home's connections to the public address are masqueraded so
    that the replies come back through the router)."""
    home_net = nat.home_ip.rsplit(".", 1)[0] + ".0/24"
    _run(nat.router_cmd("nft", "add", "rule", "ip", "swarm_nat", "prerouting", "ip", "daddr", nat.router_wan_ip,
                        "tcp", "dport", str(port), "dnat", "to", f"{nat.home_ip}:{port}"))
    _run(nat.router_cmd("nft", "add", "rule", "ip", "swarm_nat", "postrouting", "ip", "saddr", home_net, "ip",
                        "daddr", nat.home_ip, "tcp", "dport", str(port), "masquerade"))


def teardown(nat: Nat) -> None:
    """Remove everything `build` made, whatever state it got to: processes still in the namespaces first
    (a namespace with a process in it outlives `ip netns del`), then the nft table, namespaces and veth."""
    for ns in (nat.home, nat.router):
        listed = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        for pid in listed.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    subprocess.run(nat.router_cmd("nft", "delete", "table", "ip", "swarm_nat"), capture_output=True)
    for ns in (nat.home, nat.router):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "link", "del", nat.public_veth], capture_output=True)  # gone with the router already


@contextmanager
def home_behind_nat() -> Iterator[Nat]:
    """A built NAT for one test or module; where none can be built, the test fails with one line (no skip)."""
    try:
        nat, why = build(), ""
    except NatUnavailable as e:
        why = str(e)
    if why:
        pytest.fail(why, pytrace=False)
    try:
        yield nat
    finally:
        teardown(nat)
