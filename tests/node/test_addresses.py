"""The announced address is one peers can dial: never a wildcard (node/host/addresses.py)."""

from node.host.addresses import announced_host


def test_the_operator_and_a_specific_bind_address_win():
    assert announced_host("0.0.0.0", "203.0.113.7", []) == "203.0.113.7"
    assert announced_host("127.0.0.1", "", ["/ip4/10.9.9.9/tcp/1"]) == "127.0.0.1"


def test_a_wildcard_becomes_the_source_of_the_route_to_the_swarm():
    assert announced_host("0.0.0.0", "", ["/ip4/127.0.0.1/tcp/5/p2p/Qm"]) == "127.0.0.1"
    guessed = announced_host("0.0.0.0", "", ["/dns4/example.org/tcp/5"])  # not an address: the default route
    assert guessed not in ("", "0.0.0.0")
