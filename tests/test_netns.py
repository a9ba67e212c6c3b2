"""The NAT harness itself (tests/netns.py): home reaches the public side, masqueraded; nothing reaches home."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.netns import home_behind_nat


@pytest.fixture
def nat():
    with home_behind_nat() as built:
        yield built


def test_home_reaches_public_through_masquerade(nat):
    with socket.socket() as server:
        server.bind((nat.public_ip, 0))
        server.listen()
        server.settimeout(10)
        port = server.getsockname()[1]
        dial = subprocess.Popen(nat.home_cmd(sys.executable, "-c",
                                             f"import socket; socket.create_connection(('{nat.public_ip}', {port}), 5)"))
        conn, (seen, _) = server.accept()
        conn.close()
        assert dial.wait(10) == 0
    assert seen == nat.router_wan_ip  # not nat.home_ip: the router masqueraded it


LISTEN = ("import socket, sys, time; s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen(); "
          "print(s.getsockname()[1], flush=True); time.sleep(30)")


def test_public_cannot_reach_home(nat):
    listener = subprocess.Popen(nat.home_cmd(sys.executable, "-c", LISTEN), stdout=subprocess.PIPE, text=True)
    try:
        port = int(listener.stdout.readline())
        # home itself answers on that port ...
        inside = subprocess.run(nat.home_cmd(sys.executable, "-c",
                                             f"import socket; socket.create_connection(('{nat.home_ip}', {port}), 2)"))
        assert inside.returncode == 0
        # ... but neither the router's public address nor home's own (routed through the router) lets one in
        for address in (nat.router_wan_ip, nat.home_ip):
            with pytest.raises(TimeoutError):  # dropped: no reset, no answer
                socket.create_connection((address, port), timeout=1.5).close()
    finally:
        listener.kill()
        listener.wait()


def test_teardown_leaves_nothing():
    with home_behind_nat() as built:
        pass
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert built.home not in namespaces and built.router not in namespaces
    assert built.public_veth not in links


def test_a_forwarded_port_lets_public_in_at_the_routers_address(nat):
    from tests.netns import forward_port

    listener = subprocess.Popen(nat.home_cmd(sys.executable, "-c", LISTEN), stdout=subprocess.PIPE, text=True)
    try:
        port = int(listener.stdout.readline())
        forward_port(nat, port)
        socket.create_connection((nat.router_wan_ip, port), timeout=5).close()
        # home reaches it at the public address too (NAT loopback)
        inside = subprocess.run(nat.home_cmd(sys.executable, "-c", f"import socket; "
                                             f"socket.create_connection(('{nat.router_wan_ip}', {port}), 5)"))
        assert inside.returncode == 0
    finally:
        listener.kill()
        listener.wait()
