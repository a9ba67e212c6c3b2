"""What replicas agree on: the round's sync strategy (chosen by the planner from its members' preferences, carried
in the plan), and which replica's weights are right when digests differ."""

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


def reference_replica(ready: dict[str, tuple[int, str]], my_digest: str) -> str | None:
    """The replica to copy from when our weights (or anchor) are not the majority's (ties: the lowest peer id);
    None when ours are. `ready`: peer id -> (work, digest) of the replicas that took part, us included."""
    votes = Counter(digest for _, digest in ready.values())
    if not votes:
        return None
    best = max(votes.values())
    reference = min(peer for peer, (_, digest) in ready.items() if votes[digest] == best)
    return None if ready[reference][1] == my_digest else reference
