"""The node's view of the swarm through the hivemind DHT: heartbeats and round plans.

Key schema: see protocol/records.py. Records carry an expiration and are refreshed by their owner,
so a dead node's records simply expire; a node that leaves cleanly overwrites its record with a tombstone.
"""

from __future__ import annotations

import logging

from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from protocol.records import TOMBSTONE, NodeRecord, RecordError, RoundPlan, is_tombstone, nodes_key, plan_key

log = logging.getLogger(__name__)


class SwarmDirectory:
    def __init__(self, dht: DHT, swarm: str, peer_id: str, ttl: float):
        self.dht = dht
        self.swarm = swarm
        self.peer_id = peer_id
        self.ttl = ttl

    # ---- membership ------------------------------------------------------------------------------------------
    def announce(self, record: NodeRecord) -> bool:
        return bool(self.dht.store(nodes_key(self.swarm), record.to_value(), get_dht_time() + self.ttl,
                                   subkey=self.peer_id))

    def withdraw(self) -> bool:
        """Replace our record with a tombstone that outlives it, so peers stop routing to us at once."""
        return bool(self.dht.store(nodes_key(self.swarm), TOMBSTONE, get_dht_time() + self.ttl + 1,
                                   subkey=self.peer_id))

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
