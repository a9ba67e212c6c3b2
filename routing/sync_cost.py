"""What the replicas' sync adds to a round, and the whole round: iteration + sync + the plan's own overhead.

The model follows the runtime (node/sync/): each stage's replica group syncs on its own, all groups at once,
and the round waits for the slowest. A replica pulls from all its peers at once, one call per peer over
independent links, so a phase lasts, for that replica, as long as its slowest pull, and for the group as
long as its slowest replica. A pull is one call: the request crosses the link one way and the answer comes
back, so it pays the latency both ways and its bytes once (as node/dataplane/link_emulation.py charges it).

Strategies, by the names of protocol/sync_names.py (routing does not import protocol):
- `all-to-all`: one phase; each replica pulls every other replica's whole G.
- `every-round`: reduce-scatter then all-gather, two phases of G/n per peer.
- `outer`: every H rounds the same two phases on G·wire_ratio bytes; the sync starts after a round's step and
  is applied at the end of the next round, so only what outlasts one iteration shows: max(0, sync - iteration)
  once per H rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

EVERY_ROUND, ALL_TO_ALL, OUTER = "every-round", "all-to-all", "outer"


@dataclass(frozen=True)
class SyncSetting:
    strategy: str  # "every-round", "all-to-all" or "outer"
    every: int = 1  # H: rounds between syncs under "outer"
    wire_ratio: float = 1.0  # wire bytes per fp32 gradient byte under "outer" (its pseudo-gradient codec)

    def __post_init__(self) -> None:
        if self.strategy not in (EVERY_ROUND, ALL_TO_ALL, OUTER):
            raise ValueError(f"unknown sync strategy {self.strategy!r}")
        if self.every < 1 or not self.wire_ratio > 0:
            raise ValueError(f"sync every {self.every} rounds at wire ratio {self.wire_ratio}: need >= 1 and > 0")


def sync_seconds(groups: Sequence[Sequence[int]], stage_bytes: Sequence[float], latency_s: np.ndarray,
                 bandwidth_Bps: np.ndarray, setting: SyncSetting, iteration_s: float) -> float:
    """Seconds the sync phase adds to one round, averaged over rounds. groups[s] = node indices of stage s's replicas;
    stage_bytes[s] = fp32 gradient bytes of stage s (G); latency_s/bandwidth_Bps: (N, N) one-way latency and
    bandwidth, indexed [from, to]."""
    slowest = 0.0
    for group, nbytes in zip(groups, stage_bytes):
        n = len(group)
        if n < 2:
            continue  # a lone replica has nobody to sync with
        if setting.strategy == ALL_TO_ALL:
            t = _phase(group, nbytes, latency_s, bandwidth_Bps)
        else:
            wire = nbytes * (setting.wire_ratio if setting.strategy == OUTER else 1.0)
            t = 2 * _phase(group, wire / n, latency_s, bandwidth_Bps)
        slowest = max(slowest, t)
    if setting.strategy == OUTER:
        return max(0.0, slowest - iteration_s) / setting.every
    return slowest


def _phase(group: Sequence[int], nbytes: float, latency_s: np.ndarray, bandwidth_Bps: np.ndarray) -> float:
    """Every replica pulls `nbytes` from every other at once: the slowest pull of the group."""
    g = np.asarray(group)
    lat = latency_s[np.ix_(g, g)]
    # pull[i, p]: replica i asks p (latency i -> p), p answers (latency p -> i, bytes over p -> i)
    pull = lat + lat.T + nbytes / bandwidth_Bps[np.ix_(g, g)].T
    np.fill_diagonal(pull, 0.0)
    return float(pull.max())


def whole_round_seconds(iteration_s: float, sync_s: float, overhead_s: float) -> float:
    """The round as a sequence: the pipeline iteration, then what the sync adds, then the plan's own overhead."""
    return iteration_s + sync_s + overhead_s
