"""The round ledger alone: what a round expects, when it is complete, and re-routes by notice or by hop."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import grpc
import pytest
import torch

from node.host.metrics import NodeMetrics
from node.stage.activations import Saved
from node.stage.executor import StageExecutor
from node.stage.ledger import RoundLedger, hop_key
from protocol.envelope import HopSpec, make_envelope
from protocol.errors import ProtocolError

ME = "me-peer"
ORIGIN = HopSpec(0, "origin-peer", "o:1")
PLANNED = (ORIGIN, HopSpec(1, ME, "me:1"), HopSpec(2, "x-peer", "x:1"), ORIGIN)  # we are hop 1
REROUTED = (ORIGIN, HopSpec(1, "y-peer", "y:1"), HopSpec(2, ME, "me:1"), ORIGIN)  # we are hop 2


def env(round_=0, mb=0, hop=1, attempt=0, path=PLANNED):
    return make_envelope("s", round_, mb, path, hop=hop, attempt=attempt)


def refused(call) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        call()
    return e.value


def ledger_at_round_0(recheck_s: float = 0.25) -> RoundLedger:
    ledger = RoundLedger(ME, recheck_s, first_round=0)
    ledger.begin_round(0, {(0, 1), (1, 1)}, origins={ORIGIN.peer_id})
    return ledger


def test_check_forward_refuses_with_the_status_and_reason_and_changes_nothing():
    ledger = ledger_at_round_0()
    ledger.claim_backward((0, 0, 0, 1))
    newer = env(attempt=1, hop=2, path=REROUTED)
    assert ledger.check_forward(newer) is True
    assert ledger.check_forward(newer) is True  # still newer: nothing was adopted
    assert ledger.expected(0) == (0, frozenset({1}))
    assert ledger.backward_claimed((0, 0, 0, 1))
    assert ledger.check_forward(env()) is False  # the plan's own hop
    assert ledger.check_forward(env(round_=1)) is False  # the next round's: parked, not judged yet

    cases = [(env(round_=2), grpc.StatusCode.FAILED_PRECONDITION, "unknown round 2; this node is at round 0"),
             (env(hop=2), grpc.StatusCode.NOT_FOUND, "microbatch 0 hop 2 is not in round 0's plan for this node"),
             (env(mb=7), grpc.StatusCode.NOT_FOUND, "microbatch 7 hop 1 is not in round 0's plan for this node")]
    for e, code, reason in cases:
        error = refused(lambda: ledger.check_forward(e))
        assert (error.code, error.reason) == (code, reason)
    assert ledger.expected(0) == (0, frozenset({1})) and ledger.expected(7) is None

    ledger.adopt_attempt(0, 0, 2, REROUTED)
    for stale in (env(attempt=1, hop=2, path=REROUTED), env(attempt=1, hop=3, path=REROUTED)):  # forward, final
        error = refused(lambda: ledger.check_forward(stale))
        assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                              "microbatch 0 attempt 1 was re-routed (now attempt 2)")
    ledger.end_round(0)
    error = refused(lambda: ledger.check_forward(env()))
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                          "round 0 is over; this node is at round 0")


def test_adopt_attempt_expects_the_new_hops_and_forgets_older_gradients():
    ledger = ledger_at_round_0()
    ledger.claim_backward((0, 0, 0, 1))
    ledger.claim_backward((0, 1, 0, 1))  # another microbatch: untouched
    assert ledger.adopt_attempt(0, 0, 1, REROUTED)
    assert ledger.expected(0) == (1, frozenset({2}))
    assert not ledger.backward_claimed((0, 0, 0, 1)) and ledger.backward_claimed((0, 1, 0, 1))
    # Not newer, or not this round: nothing changes.
    assert not ledger.adopt_attempt(0, 0, 1, PLANNED)
    assert not ledger.adopt_attempt(1, 0, 5, PLANNED)
    assert ledger.expected(0) == (1, frozenset({2}))
    assert ledger.adopt_attempt(0, 0, 2, ())  # the origin gave the microbatch up: nothing owed
    assert ledger.expected(0) == (2, frozenset())


class _Stage(SimpleNamespace):
    """Enough of a PipelineStage for the executor's admission: its config."""


def executor() -> StageExecutor:
    stage = _Stage(config=SimpleNamespace(hidden_size=4, max_position_embeddings=16))
    ex = StageExecutor(ME, {1: stage, 2: stage}, torch.device("cpu"), torch.float32, memory_slots=4,
                       metrics=NodeMetrics(), send=lambda *a: None, recheck_s=0.25, compute_smoothing=0.2,
                       join_timeout=5.0)  # never started: hops stay queued
    ex.begin_round(0, {(0, 1)}, origins={ORIGIN.peer_id})
    # What attempt 0 left here: a forward it ran, and the gradient that came back for it.
    kept = env()
    assert ex.store.try_reserve(0, 0)
    ex.store.put(hop_key(kept), Saved(1, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), kept))
    ex.ledger.claim_backward(hop_key(kept))
    return ex


def test_a_reroute_notice_and_a_newer_attempts_hop_leave_the_same_state():
    by_notice, by_hop = executor(), executor()
    assert by_notice.reroute(0, 0, 1, list(REROUTED)) == 1  # the kept hop of attempt 0 was freed
    assert by_hop.accept_forward(env(attempt=1, hop=2, path=REROUTED), torch.zeros(1, 2, 4)) == 1
    for ex in (by_notice, by_hop):
        assert ex.ledger.expected(0) == (1, frozenset({2}))
        assert not ex.ledger.backward_claimed((0, 0, 0, 1))
        assert not ex.store.contains((0, 0, 0, 1))
    # The hop itself was admitted too; a second copy of it is refused.
    error = refused(lambda: by_hop.accept_forward(env(attempt=1, hop=2, path=REROUTED), torch.zeros(1, 2, 4)))
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert by_notice.reroute(0, 0, 1, list(REROUTED)) == 0  # the same notice twice frees nothing more


def test_the_round_completes_only_when_its_hops_are_done_and_its_origins_closed():
    ledger = ledger_at_round_0()
    assert not ledger.round_complete()
    ledger.hop_done(env(mb=0), stage=1)
    ledger.hop_done(env(mb=1, attempt=3), stage=1)  # an attempt we do not expect discharges nothing
    assert ledger.expected(1) == (0, frozenset({1}))
    ledger.hop_done(env(mb=1), stage=1)
    assert not ledger.round_complete()  # the origin may still re-route something here
    ledger.origin_done(0, ORIGIN.peer_id)
    assert ledger.round_complete()
    assert ledger.end_round(0) == {1: 3}  # every backward counted: the stage's gradients sum them
    assert not ledger.round_complete()  # ended


def test_a_hop_rerouted_away_unnoticed_does_not_hold_the_round_once_its_origin_is_done():
    """A node rounds behind misses the re-route notice of a hop the plan gave it; the origin finished the
    microbatch elsewhere and says it is done: the hop will not come, and the round must not wait it out."""
    ledger = ledger_at_round_0()
    ledger.hop_done(env(mb=0), stage=1)
    assert ledger.expected(1) == (0, frozenset({1}))  # never comes: it went elsewhere
    assert not ledger.round_complete()
    ledger.origin_done(0, ORIGIN.peer_id)
    assert ledger.round_complete()


def test_an_early_done_notice_and_parked_hops_wait_for_their_round():
    ledger = RoundLedger(ME, 0.25, first_round=0)
    ledger.begin_round(0, set())
    ledger.origin_done(1, ORIGIN.peer_id)  # round 1 has not begun here yet
    assert ledger.park(env(round_=1, mb=0), "planned") == 1
    assert ledger.park(env(round_=1, mb=9), "unplanned") == 2
    ledger.end_round(0)
    run, dropped = ledger.begin_round(1, {(0, 1)}, origins={ORIGIN.peer_id})
    assert run == ["planned"] and [(e.round, e.microbatch) for e in dropped] == [(1, 9)]
    ledger.hop_done(env(round_=1, mb=0), stage=1)
    assert ledger.round_complete()  # the origin's notice was kept for round 1


def test_wait_round_returns_when_complete_and_honours_cancel():
    ledger = ledger_at_round_0(recheck_s=0.01)
    cancel = threading.Event()
    threading.Timer(0.1, cancel.set).start()
    started = time.monotonic()
    assert ledger.wait_round(30, cancel.is_set) is False
    assert time.monotonic() - started < 5  # the cancel was seen at a re-check, long before the timeout
    assert ledger.wait_round(0.05) is False  # time ran out

    def finish():
        for mb in (0, 1):
            ledger.hop_done(env(mb=mb), stage=1)
        ledger.origin_done(0, ORIGIN.peer_id)
    threading.Timer(0.1, finish).start()
    assert ledger.wait_round(30) is True


def test_a_next_round_reroute_that_comes_before_the_round_begins_is_kept():
    """The origin may be a round ahead: a re-route notice, and the re-routed hop itself, can reach a node still
    finishing the previous round. Both must count once it begins the round (they were dropped: the hop was
    acknowledged, parked, and never run, and the origin waited out its round for it)."""
    ledger = ledger_at_round_0()
    assert not ledger.adopt_attempt(1, 0, 1, REROUTED)  # early: kept for round 1
    assert ledger.check_forward(env(round_=1, attempt=1, hop=2, path=REROUTED)) is False  # parked
    ledger.park(env(round_=1, attempt=1, hop=2, path=REROUTED), "rerouted hop")
    ledger.park(env(round_=1, mb=1, attempt=2, hop=2, path=REROUTED), "rerouted, notice late")
    ledger.park(env(round_=1, mb=2, attempt=0), "superseded")
    assert not ledger.adopt_attempt(1, 2, 1, REROUTED)  # mb 2 moved away from us: hop 1 of attempt 0 is stale
    ledger.end_round(0)
    run, dropped = ledger.begin_round(1, {(0, 1), (2, 1)}, origins={ORIGIN.peer_id})
    assert run == ["rerouted hop", "rerouted, notice late"]
    assert [(e.microbatch, e.attempt) for e in dropped] == [(2, 0)]
    assert ledger.expected(0) == (1, frozenset({2})) and ledger.expected(1) == (2, frozenset({2}))
    assert ledger.expected(2) == (1, frozenset({2}))
    # An early notice for a round that never begins here is forgotten.
    assert not ledger.adopt_attempt(2, 0, 3, REROUTED)
    ledger.end_round(1)
    ledger.begin_round(3, {(0, 1)})
    assert ledger.expected(0) == (0, frozenset({1}))
