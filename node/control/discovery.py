"""The node's view of the swarm through the hivemind DHT: heartbeats and round plans.

Key schema: see protocol/records.py. Records carry an expiration and are refreshed by their owner,
so a dead node's records simply expire; a node that leaves cleanly overwrites its record with a tombstone.

Every record this node writes sits under its owner subkey and is signed (protocol/record_auth.py);
readers take the writer's peer id from that subkey and drop records without one. A round's plan is
acted on only when the round's planner, chosen from those verified members, signed it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from node.control.planning import choose_planner, membership_digest
from protocol.record_auth import owner_peer_id
from protocol.records import (TOMBSTONE, NodeRecord, RecordError, RoundPlan, is_tombstone,
                              nodes_key, plan_key)

Dropped = Callable[[str], None]  # called with why a record was dropped: "unsigned", "not_planner", "malformed"

log = logging.getLogger(__name__)

def get_latest(dht: DHT, key: str, timeout: float | None, stop: threading.Event | None = None,
               recheck_s: float | None = None):
    """The newest entry under `key`, or None. TimeoutError when the DHT does not answer within `timeout`
    seconds, or when `stop` is set first (looked at every `recheck_s`: a stopping node does not wait for a
    hung DHT process)."""
    future = dht.get(key, latest=True, return_future=True)
    if stop is None:
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = recheck_s if deadline is None else max(0.0, min(recheck_s, deadline - time.monotonic()))
        try:
            return future.result(step)
        except TimeoutError:
            if (stop is not None and stop.is_set()) or (deadline is not None and time.monotonic() >= deadline):
                future.cancel()
                raise


class SwarmDirectory:
    def __init__(self, dht: DHT, swarm: str, peer_id: str, ttl: float, owner: bytes,
                 on_dropped: Dropped = lambda reason: None, read_timeout: float | None = None,
                 stop: threading.Event | None = None, recheck_s: float | None = None):
        self.dht = dht
        self.swarm = swarm
        self.peer_id = peer_id
        self.ttl = ttl
        self.owner = owner  # our owner subkey: only we can write under it (protocol/record_auth.py)
        self.on_dropped = on_dropped
        self.read_timeout = read_timeout  # a read slower than this finds nothing new (a hung DHT process)
        self.stop = stop  # set when the node stops: reads give up at once
        self.recheck_s = recheck_s  # how often a read looks at `stop`
        self._members_seen: dict[str, NodeRecord] = {}
        self._reported: set[tuple[int, bytes]] = set()  # plans already logged as refused, so polling stays quiet

    # ---- membership ------------------------------------------------------------------------------------------
    def announce(self, record: NodeRecord, timeout: float | None = None) -> bool:
        """Store our record; False if the DHT did not confirm it within `timeout` seconds."""
        return self._store(nodes_key(self.swarm), record.to_value(), get_dht_time() + self.ttl, timeout)

    def withdraw(self, timeout: float | None = None) -> bool:
        """Replace our record with a tombstone that outlives it, so peers stop routing to us at once."""
        return self._store(nodes_key(self.swarm), TOMBSTONE, get_dht_time() + self.ttl + 1, timeout)

    def _store(self, key: str, value, expiration: float, timeout: float | None) -> bool:
        """Store under our owner subkey; False if the DHT did not confirm it within `timeout` seconds."""
        future = self.dht.store(key, value, expiration, subkey=self.owner, return_future=True)
        try:
            return bool(future.result(timeout))
        except TimeoutError:  # a hung DHT process: the caller's heartbeat age shows it
            future.cancel()
            return False

    def members(self) -> dict[str, NodeRecord]:
        """Live, well-formed node records of this swarm, by peer id (those last seen if the DHT is too slow)."""
        try:
            self._members_seen = read_members(self.dht, self.swarm, self.on_dropped, self.read_timeout, self.stop,
                                              self.recheck_s)
        except TimeoutError:
            log.warning("the DHT did not answer within %.1f s; using the members seen before", self.read_timeout)
        return dict(self._members_seen)

    # ---- plans -----------------------------------------------------------------------------------------------
    def publish_plan(self, plan: RoundPlan, ttl: float) -> bool:
        return self._store(plan_key(self.swarm, plan.round), plan.to_value(), get_dht_time() + ttl, self.read_timeout)

    def fetch_plan(self, round_: int, members: dict[str, NodeRecord] | None = None) -> RoundPlan | None:
        """The round's plan, if the round's planner (chosen from the verified members) has signed one.

        Plans from anyone else are ignored and counted once each: only the owner of a subkey can
        write under it, so a plan under another subkey is never the planner's.
        """
        try:
            entry = get_latest(self.dht, plan_key(self.swarm, round_), self.read_timeout, self.stop,
                               self.recheck_s)
        except TimeoutError:  # the caller polls again
            return None
        if entry is None or not isinstance(entry.value, dict):
            return None
        members = self.members() if members is None else members
        planner = choose_planner(members)
        for subkey, item in entry.value.items():
            signer = owner_peer_id(subkey)
            if signer != planner or planner is None:
                self._report(round_, subkey, "unsigned" if signer is None else "not_planner",
                             f"ignoring a plan for round {round_} signed by {signer or 'nobody'}: the round's "
                             f"planner is {planner}")
                continue
            try:
                plan = RoundPlan.from_value(item.value)
                if plan.round != round_ or plan.planner != signer:
                    raise RecordError(f"it names round {plan.round} and planner {plan.planner}")
            except RecordError as e:
                self._report(round_, subkey, "malformed", f"ignoring a malformed plan for round {round_}: {e}")
                continue
            if plan.membership_digest != membership_digest(members):
                self._report(round_, b"digest", None, f"round {round_}: the planner saw another membership "
                             f"(digest {plan.membership_digest}, here {membership_digest(members)})")
            return plan
        return None

    def _report(self, round_: int, subkey, reason: str | None, message: str) -> None:
        key = (round_, subkey if isinstance(subkey, bytes) else str(subkey).encode())
        if key in self._reported:
            return
        self._reported.add(key)
        if len(self._reported) > 10_000:  # rounds move on; forget old ones
            self._reported.clear()
        if reason is None:
            log.info("%s", message)
        else:
            log.warning("%s", message)
            self.on_dropped(reason)


def read_members(dht: DHT, swarm: str, on_dropped: Dropped = lambda reason: None, timeout: float | None = None,
                 stop: threading.Event | None = None, recheck_s: float | None = None) -> dict[str, NodeRecord]:
    """Verified members: records under an owner subkey (the DHT checked their signatures), by that owner's peer
    id. TimeoutError as for `get_latest`."""
    entry = get_latest(dht, nodes_key(swarm), timeout, stop, recheck_s)
    if entry is None or not isinstance(entry.value, dict):
        return {}
    members = {}
    for subkey, item in entry.value.items():
        peer_id = owner_peer_id(subkey)
        if peer_id is None:
            on_dropped("unsigned")
            continue
        if is_tombstone(item.value):
            continue
        try:
            record = NodeRecord.from_value(peer_id, item.value)
        except RecordError as e:
            log.debug("skipping malformed node record from %s: %s", peer_id, e)
            on_dropped("malformed")
            continue
        if record.swarm == swarm:
            members[peer_id] = record
    return members
