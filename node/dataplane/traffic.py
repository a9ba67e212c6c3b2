"""Bytes this node's calls moved on each link, both ways, by kind of traffic (activations, sync, state, experts,
control): counted from the same frames as the node's byte counters, published with the link estimates
(`<swarm>/links`) and shown by `swarm-node status --links`. Each call is counted by its caller, so every byte
of the swarm's data plane is on the books of exactly one link's sender."""

from __future__ import annotations

import threading
from collections import defaultdict

from protocol.service import FrameMeter, kind_of


class LinkTraffic:
    def __init__(self) -> None:
        self._bytes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))  # peer -> kind -> bytes
        self._lock = threading.Lock()

    def meter_for(self, peer: str, node_meter: FrameMeter) -> FrameMeter:
        """A meter for calls to `peer` that counts them here and in `node_meter`."""
        def meter(direction: str, method: str, nbytes: int) -> None:
            node_meter(direction, method, nbytes)
            with self._lock:
                self._bytes[peer][kind_of(method)] += nbytes
        return meter

    def snapshot(self) -> dict[str, dict[str, int]]:
        """By peer, bytes by kind so far."""
        with self._lock:
            return {peer: dict(kinds) for peer, kinds in self._bytes.items()}
