"""Bans: peers an origin keeps out of its plans and paths after a hop of theirs failed a check.

An offence is `--ban-after-refusals` accusations accepted by this origin within `--ban-window` rounds (each: a
receiver on the microbatch's path reported that one of the peer's hops failed its hop checks,
node/stage/hop_checks.py), or one accusation it knows to be false; at most one offence per peer and round. The
ban lasts `base_rounds` rounds from the offence's round, doubled at each further offence, as Petals grows
its bans. A ban is this node's own judgement: it shapes the plans it makes as planner and the paths it
re-routes its microbatches on, and it is published in its record (`bans`), so `swarm-node status` shows who
is banned, by whom and why.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ban:
    peer: str
    offences: int
    until_round: int  # the first round the peer may be planned again
    reason: str  # the latest accusation's
    accuser: str  # the peer that made it

    def to_value(self) -> dict:
        return dict(offences=self.offences, until=self.until_round, reason=self.reason, accuser=self.accuser)


class Bans:
    def __init__(self, base_rounds: int, refusals: int = 1, window: int = 1,
                 emit: Callable[..., None] = lambda event, **fields: None):
        """An offence is `refusals` of a peer's hops refused within `window` rounds (an honest hop can be an
        outlier once; a poisoner's are refused every time), or one certainly false accusation."""
        self.base_rounds = base_rounds
        self.refusals = refusals
        self.window = window
        self.emit = emit  # the node's event log: one "banned" event per offence
        self._bans: dict[str, Ban] = {}
        self._refused: dict[str, list[int]] = {}  # peer -> rounds of its refused hops not yet made an offence
        self._rounds_counted: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    def refused(self, peer: str, round_: int, reason: str, accuser: str) -> Ban | None:
        """A receiver refused one of `peer`'s hops in `round_`; the ban this makes it serve, if it makes one."""
        with self._lock:
            current = self._bans.get(peer)
            if current is not None and round_ < current.until_round:
                return None  # serving a ban already: late hops of the round it was banned in
            rounds = [r for r in self._refused.get(peer, []) if r > round_ - self.window] + [round_]
            if len(rounds) < self.refusals:
                self._refused[peer] = rounds
                log.info("a hop of %s was refused (%d of the %d in %d rounds that make an offence), reported by "
                         "%s: %s", peer[-8:], len(rounds), self.refusals, self.window, accuser[-8:], reason)
                return None
            self._refused.pop(peer, None)
        return self.offence(peer, round_, reason, accuser)

    def offence(self, peer: str, round_: int, reason: str, accuser: str) -> Ban | None:
        """Count `peer`'s offence in `round_`; the ban it now serves (None when that round already counted)."""
        with self._lock:
            if (peer, round_) in self._rounds_counted:
                return None
            self._rounds_counted = {k for k in self._rounds_counted if k[1] >= round_ - 1} | {(peer, round_)}
            previous = self._bans.get(peer)
            offences = (previous.offences if previous else 0) + 1
            ban = Ban(peer, offences, round_ + 1 + self.base_rounds * 2 ** (offences - 1), reason[:200], accuser)
            self._bans[peer] = ban
        log.warning("peer %s banned until round %d (offence %d, reported by %s): %s", peer[-8:], ban.until_round,
                    offences, accuser[-8:], reason)
        self.emit("banned", peer=peer, round=round_, until=ban.until_round, offences=offences, reason=ban.reason,
                  accuser=accuser)
        return ban

    def banned(self, round_: int) -> frozenset[str]:
        """Peers serving a ban in `round_`."""
        with self._lock:
            return frozenset(p for p, b in self._bans.items() if round_ < b.until_round)

    def on_record(self) -> dict[str, Ban]:
        """Every peer with an offence, its latest ban (served or not): offences count for life."""
        with self._lock:
            return dict(self._bans)
