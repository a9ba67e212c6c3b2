"""StageCompute alone: real tiny stages, a fake send and fake origin hooks, no network."""

from __future__ import annotations

import copy
import queue
import threading
import time

import pytest
import torch

from lm.build import build_stage
from lm.presets import resolve_model
from lm.tokenizer import ByteTokenizer
from node.host.metrics import NodeMetrics
from node.stage.activations import ActivationStore
from node.stage.compute import OriginHooks, StageCompute
from node.stage.ledger import RoundLedger
from protocol.envelope import HopSpec, make_envelope
from routing.order import BACKWARD, FORWARD, LOSS

ME = "me-peer"
SPEC = resolve_model("tiny", ByteTokenizer.vocab_size)
BATCH, SEQ, HIDDEN = 2, 8, SPEC.config.hidden_size


class Hooks(OriginHooks):
    def __init__(self, labels: torch.Tensor | None = None):
        self._labels = labels
        self.events: list[tuple] = []

    def labels(self, round_, microbatch):
        return self._labels

    def on_loss(self, round_, microbatch, loss, logits):
        self.events.append(("loss", round_, microbatch, loss, tuple(logits.shape)))

    def on_done(self, round_, microbatch):
        self.events.append(("done", round_, microbatch))

    def on_failed(self, round_, microbatch, reason):
        self.events.append(("failed", round_, microbatch, reason))


class Harness:
    """A started StageCompute whose sends land in a queue."""

    def __init__(self, stages, hooks=OriginHooks(), expected=frozenset(), compute_smoothing=0.2, join_timeout=5.0):
        self.sent: queue.Queue = queue.Queue()
        self.store = ActivationStore(slots=4)
        self.ledger = RoundLedger(ME, recheck_s=0.25)
        self.ledger.begin_round(0, expected)
        self.compute = StageCompute(ME, stages, torch.device("cpu"), self.store, self.ledger, NodeMetrics(),
                                    send=lambda kind, env, t: self.sent.put((kind, env, t)), hooks=hooks,
                                    compute_smoothing=compute_smoothing, join_timeout=join_timeout)
        self.compute.start()

    def run(self, kind, env, tensor):
        if kind != BACKWARD:
            assert self.store.try_reserve(env.round, env.microbatch)  # what admission does before submitting
        self.compute.submit(self.compute.task(kind, env, tensor))

    def next_send(self):
        return self.sent.get(timeout=60)

    def close(self):
        self.compute.stop()


@pytest.fixture
def middle():
    """Stage 1 of 2, hosted by a node that is not the origin: hop 1 of origin -> us -> origin."""
    stage = build_stage(SPEC, 1, 2, seed=3)
    h = Harness({1: stage}, expected={(0, 1)})
    path = (HopSpec(0, "origin-peer", "o:1"), HopSpec(1, ME, "me:1"), HopSpec(0, "origin-peer", "o:1"))
    yield h, stage, path
    h.close()


def test_forward_then_backward_sends_the_stage_outputs_and_the_input_gradient(middle):
    h, stage, path = middle
    reference = copy.deepcopy(stage)
    x = torch.randn(BATCH, SEQ, HIDDEN)
    grad = torch.randn(BATCH, SEQ, HIDDEN)
    env = make_envelope("s", 0, 0, path, hop=1)

    h.run(FORWARD, env, x.clone())  # the worker marks its input as a leaf that wants a gradient
    kind, to, out = h.next_send()
    leaf = x.clone().requires_grad_(True)
    expected_out = reference(leaf)
    assert (kind, to.hop, to.microbatch) == (FORWARD, 2, 0)
    torch.testing.assert_close(out, expected_out.detach())
    assert not out.requires_grad  # the graph stays here, in the store
    assert h.store.contains((0, 0, 0, 1)) and h.store.microbatches_held() == 1
    assert set(h.compute.compute_seconds()) == {1}

    h.ledger.claim_backward((0, 0, 0, 1))
    h.run(BACKWARD, make_envelope("s", 0, 0, path, hop=1), grad)
    kind, to, g = h.next_send()
    expected_out.backward(grad)
    assert (kind, to.hop) == (BACKWARD, 0)
    torch.testing.assert_close(g, leaf.grad)
    assert not h.store.contains((0, 0, 0, 1)) and h.store.microbatches_held() == 0
    assert not h.ledger.backward_claimed((0, 0, 0, 1))
    assert h.ledger.round_complete()  # the only hop we owed is done
    assert h.ledger.end_round(0) == {1: 1}
    for (name, p), (_, q) in zip(stage.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)  # the stage's own gradients accumulated


def test_a_gradient_for_a_dropped_hop_is_skipped(middle):
    h, _, path = middle
    env = make_envelope("s", 0, 0, path, hop=1)
    h.run(FORWARD, env, torch.randn(BATCH, SEQ, HIDDEN))
    h.next_send()
    h.store.drop_round(0)
    h.run(BACKWARD, env, torch.randn(BATCH, SEQ, HIDDEN))
    h.run(FORWARD, make_envelope("s", 0, 1, path, hop=1), torch.randn(BATCH, SEQ, HIDDEN))
    kind, to, _ = h.next_send()  # the worker went on to the next hop without sending a gradient
    assert (kind, to.microbatch) == (FORWARD, 1) and h.sent.empty()


def test_the_origin_hooks_see_loss_done_and_failure():
    ids = torch.randint(0, ByteTokenizer.vocab_size, (BATCH, SEQ))
    hooks = Hooks(labels=ids)
    stage = build_stage(SPEC, 0, 2, seed=3)
    h = Harness({0: stage}, hooks=hooks, expected={(0, 0)})
    path = (HopSpec(0, ME, "me:1"), HopSpec(1, "s1-peer", "s1:1"), HopSpec(0, ME, "me:1"))
    try:
        h.run(FORWARD, make_envelope("s", 0, 0, path, hop=0), ids)
        kind, to, hidden = h.next_send()
        assert (kind, to.hop) == (FORWARD, 1) and tuple(hidden.shape) == (BATCH, SEQ, HIDDEN)

        h.run(LOSS, make_envelope("s", 0, 0, path, hop=2), hidden)
        kind, to, grad = h.next_send()
        assert (kind, to.hop) == (BACKWARD, 1) and grad.shape == hidden.shape
        (event,) = hooks.events
        assert event[:3] == ("loss", 0, 0) and event[3] == pytest.approx(stage.loss(stage.logits(hidden), ids).item())
        assert event[4] == (BATCH, SEQ, SPEC.config.vocab_size)

        h.ledger.claim_backward((0, 0, 0, 0))
        h.run(BACKWARD, make_envelope("s", 0, 0, path, hop=0), grad)
        deadline = time.monotonic() + 60
        while len(hooks.events) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hooks.events[1] == ("done", 0, 0) and h.sent.empty()  # hop 0 sends nothing back: it is the origin
        assert stage.embed_tokens.weight.grad is not None

        hooks._labels = None  # a loss without labels fails: the origin is told, the node goes on
        h.run(LOSS, make_envelope("s", 0, 1, path, hop=2), hidden)
        h.run(FORWARD, make_envelope("s", 0, 2, path, hop=0), ids)
        h.next_send()
        assert [e[:3] for e in hooks.events[2:]] == [("failed", 0, 1)]
    finally:
        h.close()


class _PerfClock:
    """perf_counter for the worker thread only: each forward takes the next of `durations` seconds."""

    def __init__(self, durations):
        self._ticks = iter(t for d in durations for t in (0.0, d))
        self._real = time.perf_counter

    def __call__(self):
        return next(self._ticks) if threading.current_thread().name == "executor" else self._real()


@pytest.mark.parametrize("smoothing, expected", [(None, [1.0, 1.2, 1.76]), (0.5, [1.0, 1.5, 2.75])])
def test_compute_seconds_is_an_ewma_of_forward_times(monkeypatch, smoothing, expected):
    stage = build_stage(SPEC, 1, 2, seed=3)
    kw = {} if smoothing is None else {"compute_smoothing": smoothing}
    h = Harness({1: stage}, **kw)
    monkeypatch.setattr(time, "perf_counter", _PerfClock([1.0, 2.0, 4.0]))
    path = (HopSpec(0, "origin-peer", "o:1"), HopSpec(1, ME, "me:1"), HopSpec(0, "origin-peer", "o:1"))
    try:
        seen = []
        for mb in range(3):
            h.run(FORWARD, make_envelope("s", 0, mb, path, hop=1), torch.randn(1, 4, HIDDEN))
            h.next_send()
            seen.append(h.compute.compute_seconds()[1])
        assert seen == pytest.approx(expected, abs=1e-12)
    finally:
        h.close()


def test_stop_ends_the_worker_within_the_join_timeout():
    h = Harness({1: build_stage(SPEC, 1, 2)}, join_timeout=5.0)
    h.close()
    assert not h.compute._worker.is_alive()
