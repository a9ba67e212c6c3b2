"""The swarm's codec per direction: chosen by the round's planner, carried in the plan, used by every sender.

Each node publishes the codecs it prefers (`--activation-codec`, `--gradient-codec`) and the codecs it
speaks in its record. The planner picks, per direction, the codec most members prefer among those every
member speaks (ties: the more exact one, in CODEC_NAMES order), so one node's setting cannot force a
codec on the others, and a node that cannot decode a codec keeps it out of the swarm.
"""

from __future__ import annotations

import math
import threading
from collections import Counter

from protocol.codec_names import CODEC_NAMES
from protocol.codecs import wire_bytes
from protocol.records import NodeRecord

RAW = ("raw", "raw")


def agree(members: dict[str, NodeRecord]) -> tuple[str, str]:
    """(activation, gradient) codecs for a round planned over `members`."""
    spoken = set(CODEC_NAMES)
    for record in members.values():
        spoken &= set(record.speaks)
    chosen = []
    for direction in (0, 1):
        votes = Counter(r.codecs[direction] for r in members.values() if r.codecs[direction] in spoken)
        ranked = sorted(votes, key=lambda name: (-votes[name], CODEC_NAMES.index(name)))
        chosen.append(ranked[0] if ranked else "raw")
    return chosen[0], chosen[1]


def hop_bytes(codec: str, shape: tuple[int, ...], raw_bytes: int) -> int:
    """Wire bytes of one activation of `shape` (`raw_bytes` unencoded) with `codec`: the price of a hop."""
    return wire_bytes(codec, shape, raw_bytes // math.prod(shape)) if shape else raw_bytes


class RoundCodecs:
    """The plan's codecs by round, for the sender threads (a hop is encoded with its own round's codecs)."""

    KEEP = 4

    def __init__(self) -> None:
        self._by_round: dict[int, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def use(self, round_: int, codecs: tuple[str, str]) -> None:
        with self._lock:
            self._by_round[round_] = codecs
            for old in [r for r in self._by_round if r < round_ - self.KEEP]:
                del self._by_round[old]

    def for_hop(self, round_: int, kind: str) -> str:
        """The codec for a `kind` ("forward" or "backward") tensor of `round_`; raw before any plan."""
        with self._lock:
            codecs = self._by_round.get(round_)
            if codecs is None and self._by_round:
                codecs = self._by_round[max(self._by_round)]
        return (codecs or RAW)[0 if kind == "forward" else 1]
