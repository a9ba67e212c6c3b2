"""The round's sync strategy: chosen by the planner from its members' preferences, carried in the plan."""

from __future__ import annotations

from collections import Counter

from protocol.records import NodeRecord
from protocol.sync_names import EVERY_ROUND, SYNC_NAMES


def agree_sync(members: dict[str, NodeRecord]) -> str:
    """The strategy most members prefer among those this version speaks (ties: the earlier in SYNC_NAMES), so
    one node's setting cannot force a strategy on the others."""
    votes = Counter(r.sync for r in members.values() if r.sync in SYNC_NAMES)
    ranked = sorted(votes, key=lambda name: (-votes[name], SYNC_NAMES.index(name)))
    return ranked[0] if ranked else EVERY_ROUND
