"""Measured links: what this node learns about the peers it sends to, and the swarm's view for planners.

Round-trip time comes from a small Ping, refreshed every few rounds to the peers this node may send to (its
next hops in the current plan, and with skipping any serving member, so the planner can weigh unused links);
throughput comes from the bytes and durations of real Forward and Backward sends (the latency part removed).
Both are EWMA-smoothed and published under `<swarm>/links` (protocol/records.py, LinksRecord). Readers
validate every value: a malformed record or entry is skipped and counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc
from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from node.config import LinkConfig
from node.control.discovery import get_latest
from node.smoothing import ewma
from protocol.record_auth import owner_peer_id
from protocol.records import LinkEstimate, LinksRecord, RecordError, RoundPlan, links_key

log = logging.getLogger(__name__)


class LinkMeter:
    """This node's measurements, by receiving peer id. Thread-safe: senders report from their threads."""

    def __init__(self, peer_id: str, settings: LinkConfig):
        self.peer_id = peer_id
        self.refresh_rounds = settings.links_refresh_rounds  # rounds between Ping refreshes and publications
        self.smoothing = settings.link_smoothing  # EWMA weight of a new sample
        # Smaller sends say little about bandwidth; they refresh latency only.
        self.min_probe_bytes = settings.min_probe_bytes
        self._rtt: dict[str, float] = {}
        self._sends: dict[str, tuple[float, float]] = {}  # peer -> EWMA of (bytes, seconds) of real sends
        self._lock = threading.Lock()

    def observe_rtt(self, peer: str, seconds: float) -> None:
        with self._lock:
            self._rtt[peer] = ewma(self._rtt.get(peer), seconds, self.smoothing)

    def observe_send(self, peer: str, nbytes: int, seconds: float) -> None:
        """A real hop of `nbytes` took `seconds` from first byte out to the receiver's acknowledgement."""
        if nbytes < self.min_probe_bytes or peer == self.peer_id:
            return
        with self._lock:
            previous = self._sends.get(peer)
            w = self.smoothing
            self._sends[peer] = (nbytes, seconds) if previous is None else \
                (ewma(previous[0], nbytes, w), ewma(previous[1], seconds, w))

    def estimates(self) -> dict[str, LinkEstimate]:
        """Peers with an RTT. Bandwidth: bytes over send time less the round trip (a send's time runs from its
        first byte out to the receiver's acknowledgement back, so it holds the latency both ways); 0 (unusable,
        so planners fall back to their default) until a large enough hop was sent."""
        with self._lock:
            out = {}
            for peer, rtt in self._rtt.items():
                nbytes, seconds = self._sends.get(peer, (0.0, 0.0))
                out[peer] = LinkEstimate(rtt, nbytes / max(seconds - rtt, 1e-6) if nbytes else 0.0)
            return out


def next_hop_endpoints(plan: RoundPlan, peer_id: str) -> dict[str, str]:
    """Peers this node sends to in `plan` (forward to the next hop, backward to the previous), by peer id."""
    out = {}
    for mb in plan.microbatches:
        for i, hop in enumerate(mb.path):
            if hop.peer_id != peer_id:
                continue
            for j in (i - 1, i + 1):
                if 0 <= j < len(mb.path) and mb.path[j].peer_id != peer_id:
                    out[mb.path[j].peer_id] = mb.path[j].endpoint
    return out


class LinkBook:
    """Pings, publishes and reads `<swarm>/links`. `ping(endpoint)` returns once a Ping answered (or raises)."""

    def __init__(self, dht: DHT, swarm: str, meter: LinkMeter, ping, ttl: float, owner: bytes,
                 max_pinged: int, read_timeout: float | None = None,
                 traffic: Callable[[], dict[str, dict[str, int]]] = dict):
        self.dht = dht
        self.read_timeout = read_timeout
        self.owner = owner  # our owner subkey: the record is signed, readers learn the sender from it
        self.swarm = swarm
        self.meter = meter
        self.ping = ping
        self.ttl = ttl
        self.max_pinged = max_pinged  # members pinged beyond the current next hops: bounds the cost in large swarms
        self.traffic = traffic  # bytes by peer and kind that our calls moved (node/dataplane/traffic.py)
        self.skipped = 0  # malformed records and entries seen by readers
        self._refresh: threading.Thread | None = None
        self._seen: dict[tuple[str, str], LinkEstimate] = {}

    def after_round(self, plan: RoundPlan, members: dict[str, str] | None = None) -> None:
        """Every few rounds (and after the first), refresh RTTs and publish, off this thread. `members`: other
        peers (id -> endpoint) a future plan may send to."""
        if plan.round % self.meter.refresh_rounds and self.meter.estimates():
            return
        if self._refresh is not None and self._refresh.is_alive():
            return
        peers = {**dict(sorted((members or {}).items())[:self.max_pinged]), **next_hop_endpoints(plan, self.meter.peer_id)}
        peers.pop(self.meter.peer_id, None)
        self._refresh = threading.Thread(target=self._measure_and_publish, args=(peers,), name="links", daemon=True)
        self._refresh.start()

    def _measure_and_publish(self, peers: dict[str, str]) -> None:
        for peer, endpoint in peers.items():
            started = time.perf_counter()
            try:
                self.ping(endpoint)
            except grpc.RpcError:
                continue
            self.meter.observe_rtt(peer, time.perf_counter() - started)
        try:
            self.publish()
        except Exception as e:  # the DHT may be shutting down; the next refresh retries
            log.debug("publishing links failed: %r", e)

    def publish(self) -> bool:
        record = LinksRecord(self.meter.peer_id, self.meter.estimates(), get_dht_time(), self.traffic())
        return bool(self.dht.store(links_key(self.swarm), record.to_value(), get_dht_time() + self.ttl,
                                   subkey=self.owner))

    def known(self) -> dict[tuple[str, str], LinkEstimate]:
        """Every published estimate, by (sender, receiver)."""
        try:
            found, skipped = read_links(self.dht, self.swarm, self.read_timeout)
        except TimeoutError:  # a hung DHT process: plan with the estimates seen before
            return dict(self._seen)
        self.skipped += skipped
        self._seen = found
        return found


def read_links(dht: DHT, swarm: str, timeout: float | None = None) -> tuple[dict[tuple[str, str], LinkEstimate], int]:
    """Published estimates by (sender, receiver), and how many malformed records or entries were skipped.
    TimeoutError when the DHT does not answer within `timeout` seconds."""
    records, skipped = read_link_records(dht, swarm, timeout)
    return {(r.peer_id, receiver): e for r in records for receiver, e in r.to.items()}, skipped


def read_traffic(dht: DHT, swarm: str, timeout: float | None = None) -> dict[tuple[str, str], dict[str, int]]:
    """Published bytes by kind, by (sender, receiver): what the sender's calls to the receiver moved."""
    records, _ = read_link_records(dht, swarm, timeout)
    return {(r.peer_id, receiver): kinds for r in records for receiver, kinds in r.traffic.items()}


def read_link_records(dht: DHT, swarm: str, timeout: float | None = None) -> tuple[list[LinksRecord], int]:
    """Every signed links record, and how many malformed records or entries were skipped."""
    entry = get_latest(dht, links_key(swarm), timeout)
    if entry is None or not isinstance(entry.value, dict):
        return [], 0
    found, skipped = [], 0
    for subkey, item in entry.value.items():
        sender = owner_peer_id(subkey)
        if sender is None:  # not signed by its writer: anyone could have put it there
            skipped += 1
            continue
        try:
            record, bad = LinksRecord.from_value(sender, item.value)
        except RecordError as e:
            log.debug("skipping malformed links record from %s: %s", sender, e)
            skipped += 1
            continue
        skipped += bad
        found.append(record)
    return found, skipped


def ping_with(clients, timeout: float):
    """A `ping(endpoint)` that goes through the data plane's channels (and the link emulator, when on)."""
    def ping(endpoint: str) -> None:
        clients.ping(endpoint, timeout)
    return ping
