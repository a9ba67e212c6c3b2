"""The node's view of the swarm through the hivemind DHT: heartbeats, round plans, averaging barriers.

Key schema: see protocol/records.py. Records carry an expiration and are refreshed by their owner,
so a dead node's records simply expire; a node that leaves cleanly overwrites its record with a tombstone.
"""

from __future__ import annotations

import logging
import threading
import time

from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from protocol.records import (TOMBSTONE, NodeRecord, RecordError, RoundPlan, averaging_key, is_tombstone,
                              nodes_key, plan_key)

log = logging.getLogger(__name__)


class SwarmDirectory:
    def __init__(self, dht: DHT, swarm: str, peer_id: str, ttl: float):
        self.dht = dht
        self.swarm = swarm
        self.peer_id = peer_id
        self.ttl = ttl

    # ---- membership ------------------------------------------------------------------------------------------
    def announce(self, record: NodeRecord, timeout: float | None = None) -> bool:
        """Store our record; False if the DHT did not confirm it within `timeout` seconds."""
        return self._store_own(record.to_value(), get_dht_time() + self.ttl, timeout)

    def withdraw(self, timeout: float | None = None) -> bool:
        """Replace our record with a tombstone that outlives it, so peers stop routing to us at once."""
        return self._store_own(TOMBSTONE, get_dht_time() + self.ttl + 1, timeout)

    def _store_own(self, value, expiration: float, timeout: float | None) -> bool:
        future = self.dht.store(nodes_key(self.swarm), value, expiration, subkey=self.peer_id, return_future=True)
        try:
            return bool(future.result(timeout))
        except TimeoutError:  # a hung DHT process: the caller's heartbeat age shows it
            future.cancel()
            return False

    def members(self) -> dict[str, NodeRecord]:
        """Live, well-formed node records of this swarm, by peer id."""
        return read_members(self.dht, self.swarm)

    # ---- plans -----------------------------------------------------------------------------------------------
    def publish_plan(self, plan: RoundPlan, ttl: float) -> bool:
        return bool(self.dht.store(plan_key(self.swarm, plan.round), plan.to_value(), get_dht_time() + ttl,
                                   subkey=plan.planner))

    def fetch_plan(self, round_: int) -> RoundPlan | None:
        """The round's plan; if several planners published one, the lowest planner id wins, everywhere."""
        entry = self.dht.get(plan_key(self.swarm, round_), latest=True)
        if entry is None or not isinstance(entry.value, dict):
            return None
        for planner in sorted(entry.value):
            try:
                plan = RoundPlan.from_value(entry.value[planner].value)
            except RecordError as e:
                log.warning("ignoring a malformed plan for round %d from %s: %s", round_, planner, e)
                continue
            if plan.round == round_:
                return plan
        return None

    # ---- averaging barrier -----------------------------------------------------------------------------------
    def ready_to_average(self, stage: int, round_: int, count: int, digest: str, ttl: float) -> None:
        """Post how many microbatches we processed, and the digest of the weights they were computed with."""
        self.dht.store(averaging_key(self.swarm, stage, round_), [count, digest], get_dht_time() + ttl,
                       subkey=self.peer_id)

    def peers_ready(self, stage: int, round_: int) -> dict[str, tuple[int, str]]:
        entry = self.dht.get(averaging_key(self.swarm, stage, round_), latest=True)
        if entry is None or not isinstance(entry.value, dict):
            return {}
        ready = {}
        for peer, item in entry.value.items():
            v = item.value
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], str):
                ready[str(peer)] = (v[0], v[1])
        return ready

    def wait_ready(self, stage: int, round_: int, peers: set[str], until: float,
                   stop: threading.Event | None = None) -> dict[str, tuple[int, str]]:
        """Wait (until the monotonic time `until`, or `stop`) for every peer in `peers` to post; returns those
        that did."""
        stop = stop or threading.Event()
        while True:
            ready = self.peers_ready(stage, round_)
            if peers <= ready.keys() or time.monotonic() > until or stop.wait(0.1):
                return {p: v for p, v in ready.items() if p in peers}


def read_members(dht: DHT, swarm: str) -> dict[str, NodeRecord]:
    entry = dht.get(nodes_key(swarm), latest=True)
    if entry is None or not isinstance(entry.value, dict):
        return {}
    members = {}
    for peer_id, item in entry.value.items():
        if is_tombstone(item.value):
            continue
        try:
            record = NodeRecord.from_value(str(peer_id), item.value)
        except RecordError as e:
            log.debug("skipping malformed node record from %s: %s", peer_id, e)
            continue
        if record.swarm == swarm:
            members[str(peer_id)] = record
    return members
