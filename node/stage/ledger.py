"""The round ledger: what this node expects, holds and has finished in the current round.

Bookkeeping only, no tensors. A round is complete once every hop the plan (or a re-route) gives this node
has finished backward and every origin that could still re-route a microbatch here has said it is done.

Thread-safe. `lock` is re-entrant, so a caller can make several calls one atomic step (the executor's
admission of a forward hop does).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Sequence

import grpc

from node.process.waits import wait_until
from protocol.errors import ProtocolError
from protocol.envelope import is_final_hop
from protocol.generated.swarm.v1 import stage_pb2 as pb

Key = tuple[int, int, int, int]  # (round, microbatch, attempt, hop), as node.stage.activations keys them


def hop_key(env: pb.Envelope) -> Key:
    return env.round, env.microbatch, env.attempt, env.hop


class RoundLedger:
    def __init__(self, peer_id: str, recheck_s: float, first_round: int = 0):
        self.peer_id = peer_id
        self.recheck_s = recheck_s  # wait_round re-checks its cancel this often: a stop event does not notify
        self.lock = threading.Condition()  # an RLock underneath
        self._round = first_round - 1  # the last round begun
        self._parked: list[tuple[pb.Envelope, object]] = []  # hops of the next round, held until it begins
        # Per microbatch of the current round: its attempt and the hops this node still owes it (a re-route
        # replaces both). None once the round has ended.
        self._expected: dict[int, tuple[int, set[int]]] | None = None
        self._admitted: set[Key] = set()  # forward hops taken (queued, parked or done)
        # Origins of the current round that may still re-route a microbatch to us: the round stays open
        # until each says it is done (or is declared dead). Notices that arrive early wait in _done_early.
        self._origins_open: set[str] = set()
        self._origins_known = False  # whether the round named its origins (else only its hops close it)
        self._done_early: set[tuple[int, str]] = set()
        # Re-routes of the next round's microbatches whose notice came before this node began it (the origin
        # may be a round ahead): microbatch -> (attempt, path), applied by begin_round.
        self._rerouted_early: dict[int, tuple[int, tuple[pb.Hop, ...]]] = {}
        self._rerouted_early_round = -1
        self._done: dict[int, int] = {}  # stage -> backward passes finished this round (what its grads sum)
        self._pending_backward: set[Key] = set()  # gradients received and not yet run

    # ---- the round's life ------------------------------------------------------------------------------------
    @property
    def round(self) -> int:
        return self._round

    def resume_at(self, round_: int) -> None:
        """A joining node copied the state after round_ - 1: take hops from `round_` on."""
        with self.lock:
            self._round = round_ - 1

    def begin_round(self, round_: int, expected: Collection[tuple[int, int]], origins: Collection[str] = frozenset()
                    ) -> tuple[list[object], list[pb.Envelope]]:
        """Start `round_`: `expected` lists the (microbatch, hop) visits the plan gives this node; `origins`
        the data nodes whose microbatches may still be re-routed here until they say they are done.
        Returns the parked items to run now, and the envelopes of parked hops the plan does not have."""
        with self.lock:
            self._round = round_
            self._origins_open = {o for o in origins if (round_, o) not in self._done_early}
            self._origins_known = bool(origins)
            self._done_early = {k for k in self._done_early if k[0] > round_}
            self._expected = {}
            for mb, hop in expected:
                self._expected.setdefault(mb, (0, set()))[1].add(hop)
            early = self._rerouted_early if self._rerouted_early_round == round_ else {}
            for mb, (attempt, path) in early.items():
                self._expected[mb] = (attempt, self._hops_on(path))
            self._rerouted_early, self._rerouted_early_round = {}, -1
            self._done = {}
            parked, self._parked = self._parked, []
            run, dropped = [], []
            for env, item in parked:
                attempt, hops = self._expected.get(env.microbatch, (-1, set()))
                if env.round == round_ and env.attempt > max(attempt, 0):  # re-routed here; its notice is late
                    attempt, hops = env.attempt, self._hops_on(env.path)
                    self._expected[env.microbatch] = (attempt, hops)
                if env.round == round_ and env.attempt == max(attempt, 0) and env.hop in hops:
                    run.append(item)
                else:
                    dropped.append(env)
        return run, dropped

    def _hops_on(self, path: Sequence[pb.Hop]) -> set[int]:
        """The hops of `path` this node owes (its last hop is the origin's own return)."""
        return {i for i, hop in enumerate(path[:-1]) if hop.peer_id == self.peer_id}

    def round_complete(self) -> bool:
        """Complete once every origin of the round said it is done: each finished its microbatches, so every hop
        this node still expects was re-routed elsewhere (a notice this node may have missed while it was rounds
        behind) and will not come. A round given no origins completes when its hops are done."""
        with self.lock:
            if self._expected is None or self._origins_open:
                return False
            return self._origins_known or not any(hops for _, hops in self._expected.values())

    def wait_round(self, timeout: float, cancelled: Callable[[], bool] = lambda: False) -> bool:
        """Block until the round is complete (True), or time ran out or the wait was cancelled (False)."""
        return wait_until(self.lock, self.round_complete, timeout, self.recheck_s, cancelled)

    def origin_done(self, round_: int, origin: str) -> None:
        """`origin` will re-route nothing more in `round_` (it finished, or it is dead)."""
        with self.lock:
            if round_ == self._round and self._expected is not None:
                self._origins_open.discard(origin)
                self.lock.notify_all()
            elif round_ == self._round + 1:  # the next round, as for parked hops; later ones cannot be ours yet
                self._done_early.add((round_, origin))

    def end_round(self, round_: int) -> dict[int, int]:
        """Close the round; returns the backward passes finished per stage (stages with none are absent)."""
        with self.lock:
            done = dict(self._done)
            self._expected = None
            self._pending_backward = {k for k in self._pending_backward if k[0] != round_}
            self._admitted = {k for k in self._admitted if k[0] > round_}
            return done

    # ---- forward hops ----------------------------------------------------------------------------------------
    def check_forward(self, env: pb.Envelope) -> bool:
        """Refuse (ProtocolError) a forward hop that is not this node's to run now. Changes nothing.
        True when it is a newer attempt of a current microbatch: the caller then calls `adopt_attempt`."""
        with self.lock:
            if env.round < self._round or (env.round == self._round and self._expected is None):
                raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"round {env.round} is over; this node is at round {self._round}")
            if env.round > self._round + 1:
                raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"unknown round {env.round}; this node is at round {self._round}")
            if env.round != self._round:
                return False  # the next round's: parked until this node begins it
            attempt, hops = self._expected.get(env.microbatch, (-1, set()))
            if is_final_hop(env):
                if env.attempt < attempt:
                    raise _rerouted(env, attempt)
                return False
            if env.attempt > max(attempt, 0):  # re-routed here before (or without) the origin's notice
                return True
            if env.attempt < attempt:
                raise _rerouted(env, attempt)
            if env.hop not in hops:
                raise ProtocolError(grpc.StatusCode.NOT_FOUND,
                                    f"microbatch {env.microbatch} hop {env.hop} is not in round {env.round}'s plan "
                                    f"for this node")
            return False

    def adopt_attempt(self, round_: int, microbatch: int, attempt: int, path: Sequence[pb.Hop]) -> bool:
        """A microbatch of the current round now travels `path` as `attempt`: expect our hops on it, and forget
        older attempts' gradients. False (and nothing changes) unless the attempt is newer than ours."""
        with self.lock:
            if round_ == self._round + 1:  # before we begin its round: kept for begin_round
                if self._rerouted_early_round != round_:
                    self._rerouted_early, self._rerouted_early_round = {}, round_
                if attempt > self._rerouted_early.get(microbatch, (0, ()))[0]:
                    self._rerouted_early[microbatch] = (attempt, tuple(path))
                return False
            if round_ != self._round or self._expected is None:
                return False
            current = self._expected.get(microbatch)
            if current is not None and current[0] >= attempt:
                return False
            self._expected[microbatch] = (attempt, self._hops_on(path))
            self._pending_backward = {k for k in self._pending_backward
                                      if not (k[0] == round_ and k[1] == microbatch and k[2] < attempt)}
            self.lock.notify_all()  # an empty path (given up) may complete the round
            return True

    def admitted(self, key: Key) -> bool:
        with self.lock:
            return key in self._admitted

    def admit(self, key: Key) -> None:
        with self.lock:
            self._admitted.add(key)

    def park(self, env: pb.Envelope, item: object) -> int:
        """Hold a next-round hop until `begin_round`; returns how many are parked."""
        with self.lock:
            self._parked.append((env, item))
            return len(self._parked)

    def expected(self, microbatch: int) -> tuple[int, frozenset[int]] | None:
        """(attempt, hops still owed) of a microbatch of the current round."""
        with self.lock:
            entry = None if self._expected is None else self._expected.get(microbatch)
            return None if entry is None else (entry[0], frozenset(entry[1]))

    # ---- backward hops ---------------------------------------------------------------------------------------
    def claim_backward(self, key: Key) -> None:
        """A gradient for `key` arrived; a second one is refused until the first has run."""
        with self.lock:
            if key in self._pending_backward:
                raise ProtocolError(grpc.StatusCode.ALREADY_EXISTS, f"backward for hop {key} was already received")
            self._pending_backward.add(key)

    def backward_claimed(self, key: Key) -> bool:
        with self.lock:
            return key in self._pending_backward

    def backward_started(self, key: Key) -> None:
        with self.lock:
            self._pending_backward.discard(key)

    def hop_done(self, env: pb.Envelope, stage: int) -> None:
        """The backward of `env`'s hop on `stage` finished."""
        with self.lock:
            if env.round != self._round or self._expected is None:
                return
            attempt, hops = self._expected.get(env.microbatch, (-1, set()))
            if attempt == env.attempt:
                hops.discard(env.hop)
            self._done[stage] = self._done.get(stage, 0) + 1
            self.lock.notify_all()


def _rerouted(env: pb.Envelope, attempt: int) -> ProtocolError:
    return ProtocolError(grpc.StatusCode.FAILED_PRECONDITION,
                         f"microbatch {env.microbatch} attempt {env.attempt} was re-routed (now attempt {attempt})")
