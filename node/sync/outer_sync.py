"""Runs the outer loop's syncs (node/sync/outer.py) for a node's hosted stages: each is started after a sync
round's step and averaged in the background while the next round computes, then applied after that round's step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from node.config import SyncConfig
from node.stage.trainer import StageTrainer
from node.sync.agreement import reference_replica
from node.sync.averaging import Averaged, Contribution, GradientExchange
from node.sync.outer import OuterStep
from protocol.records import RoundPlan
from protocol.sync_names import EVERY_ROUND, OUTER

log = logging.getLogger(__name__)


def is_sync_round(round_: int, every: int) -> bool:
    return (round_ + 1) % every == 0


def weights_epoch(plan: RoundPlan | None, round_: int) -> int:
    """Which outer step round `round_` (whose plan is `plan`, if known) computes after: rounds of one epoch differ
    by inner steps only. A sync round's step is applied at the end of the next round (RoundLoop._step_and_sync),
    so rounds k*every+1 .. (k+1)*every compute after the k-th. Without outer sync every round is of epoch 0."""
    if plan is None or plan.sync != OUTER:
        return 0
    return (round_ - 1) // plan.sync_every


@dataclass(frozen=True)
class _InFlight:
    round: int
    future: Future
    mine: torch.Tensor  # our pseudo-gradient: what we step with if the group never answers
    since: list[torch.Tensor]  # the weights it was taken from
    digest: str  # our anchor's digest when it began
    started: float  # monotonic
    received_before: float  # sync bytes received by then


@dataclass(frozen=True)
class Applied:
    """One stage's sync, applied."""

    round: int  # the sync round (the sync was applied one round later)
    peers: dict[str, tuple[int, str]]  # who took part (self included): (1, anchor digest before the sync)
    reference: str | None  # the replica to copy from when our anchor was not the majority's
    bytes: int  # received from the other replicas, counted from the frames
    seconds: float  # from the start to the end of the sync, overlapped compute included
    waited: float  # seconds the round that applied it waited for it (what the sync added to that round)


class OuterSync:
    def __init__(self, exchange: GradientExchange, settings: SyncConfig, received_bytes: Callable[[], float],
                 recheck_s: float):
        """`received_bytes()`: the sync bytes this node has received so far (from its frame counters)."""
        self.exchange = exchange
        self.settings = settings
        self.step = OuterStep(settings.outer_lr, settings.outer_momentum)
        self.received_bytes = received_bytes
        self.recheck_s = recheck_s
        self._in_flight: dict[int, _InFlight] = {}
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="outer-sync")

    def start(self, stage: int, round_: int, trainer: StageTrainer, replicas: dict[str, str], deadline: float,
              stop: threading.Event) -> bool:
        """Post this replica's pseudo-gradient for `round_` and average it with `replicas` (peer id -> endpoint)
        in the background until `deadline` (monotonic). False when there is nothing finite to post."""
        digest = trainer.anchor_digest()
        try:
            values, since = trainer.begin_sync(self.settings.codec, round_)
        except ValueError as e:
            log.warning("stage %d round %d: no sync: %s", stage, round_, e)
            return False
        mine = Contribution([values], 1, digest, self.settings.codec)
        future = self._pool.submit(self.exchange.average, stage, round_, ["pseudo_gradient"], mine, replicas,
                                   deadline, stop, EVERY_ROUND)
        self._in_flight[stage] = _InFlight(round_, future, values, since, digest, time.monotonic(),
                                           self.received_bytes())
        return True

    def finish(self, stage: int, trainer: StageTrainer, until: float, stop: threading.Event) -> Applied | None:
        """Apply `stage`'s sync in flight, waiting for the group until `until` (monotonic); None when there is
        none, or when the node stops first."""
        flight = self._in_flight.pop(stage, None)
        if flight is None:
            return None
        waiting = time.monotonic()
        while not flight.future.done() and time.monotonic() < until:
            wait([flight.future], timeout=min(self.recheck_s, max(0.0, until - time.monotonic())))
            if stop.is_set():
                return None
        waited = time.monotonic() - waiting
        averaged: Averaged | None = flight.future.result() if flight.future.done() else None
        if averaged is None:  # the group did not answer in time: the others step without us, we with ourselves
            log.warning("stage %d: the sync of round %d did not finish in time; stepping alone", stage, flight.round)
            mean, peers = flight.mine, {self.exchange.peer_id: (1, flight.digest)}
        else:
            mean, peers = averaged.grads[0], averaged.peers
        trainer.apply_sync(mean.to(torch.float32), flight.since, self.step, flight.round)
        return Applied(flight.round, peers, reference_replica(peers, flight.digest),
                       int(self.received_bytes() - flight.received_before), time.monotonic() - flight.started, waited)

    def abandon(self, stage: int, trainer: StageTrainer) -> None:
        """Forget `stage`'s sync in flight (its replicas moved on, or the node is about to copy the stage's state
        from a replica)."""
        if self._in_flight.pop(stage, None) is not None:
            trainer.abandon_sync()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

