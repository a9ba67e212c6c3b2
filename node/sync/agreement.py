"""The round's sync strategy: chosen by the planner from its members' preferences, carried in the plan."""

from __future__ import annotations

from collections import Counter

from protocol.records import NodeRecord
from protocol.sync_names import EVERY_ROUND, OUTER, SYNC_NAMES


def agree_sync(members: dict[str, NodeRecord]) -> tuple[str, int]:
    """(strategy, rounds between syncs): the strategy most members prefer among those this version speaks (ties:
    the earlier in SYNC_NAMES), then, under `outer`, the interval most of its supporters prefer (ties: the
    shorter). One node's setting cannot force either on the others."""
    votes = Counter(r.sync for r in members.values() if r.sync in SYNC_NAMES)
    ranked = sorted(votes, key=lambda name: (-votes[name], SYNC_NAMES.index(name)))
    strategy = ranked[0] if ranked else EVERY_ROUND
    if strategy != OUTER:
        return strategy, 1
    intervals = Counter(r.sync_every for r in members.values() if r.sync == OUTER)
    return strategy, min(intervals, key=lambda every: (-intervals[every], every))
