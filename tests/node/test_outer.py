"""The outer loop's state (node/sync/outer.py): pseudo-gradients with error feedback, the Nesterov step, and the
state that joins and checkpoints carry."""

from __future__ import annotations

import pytest
import torch

from node.sync.averaging import flatten, roundtrip
from node.sync.outer import OuterState, OuterStep


def _params(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(40, 30, generator=gen), torch.randn(70, generator=gen)]


def test_error_feedback_keeps_what_the_codec_lost():
    params = _params(0)
    state = OuterState(params)
    moved = [p - 0.01 * torch.randn_like(p) for p in params]
    values = state.pseudo_gradient(moved, "int8", 3)
    exact = flatten([a - m for a, m in zip(state.anchor, moved)])
    assert torch.equal(values, exact)  # no residual yet
    assert torch.allclose(state.residual, values - roundtrip(values, "int8"))
    assert 0 < float(state.residual.abs().max()) < 1e-3  # int8 lost a little, and it is kept
    again = state.pseudo_gradient(moved, "int8", 3)
    assert torch.allclose(again, exact + (values - roundtrip(values, "int8")))  # ... and sent next time


def test_a_non_finite_pseudo_gradient_is_refused():
    params = _params(1)
    state = OuterState(params)
    params[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        state.pseudo_gradient(params, "int8", 3)


def test_the_outer_step_is_nesterov_on_the_anchor_and_keeps_the_progress_since_the_sync():
    params = _params(2)
    state = OuterState(params)
    anchor = [a.clone() for a in state.anchor]
    since = [p.clone() - 0.1 for p in params]  # the weights when the sync began
    now = [p.clone() for p in params]  # one more round of progress since then: +0.1
    mean = torch.full((sum(p.numel() for p in params),), 0.5)
    step = OuterStep(lr=0.7, momentum=0.9)
    state.apply(mean, now, since, step, round_=7)
    # m = 0.5; update = 0.5 + 0.9 * 0.5 = 0.95; anchor -= 0.7 * 0.95
    for a0, a, p in zip(anchor, state.anchor, now):
        assert torch.allclose(a, a0 - 0.665, atol=1e-6)
        assert torch.allclose(p, a + 0.1, atol=1e-6)
    assert state.last_sync == 7
    state.apply(mean, now, [p.clone() for p in now], step, round_=15)  # m = 0.95; update = 0.5 + 0.855
    for a0, a in zip(anchor, state.anchor):
        assert torch.allclose(a, a0 - 0.665 - 0.7 * 1.355, atol=1e-6)


def test_replicas_with_the_same_mean_leave_the_sync_with_the_same_anchor_and_digest():
    base = _params(3)
    one, two = OuterState(base), OuterState(base)
    mean = torch.randn(sum(p.numel() for p in base))
    p1, p2 = [p + 0.01 for p in base], [p - 0.02 for p in base]
    one.apply(mean, p1, [p.clone() for p in p1], OuterStep(0.7, 0.9), 3)
    two.apply(mean, p2, [p.clone() for p in p2], OuterStep(0.7, 0.9), 3)
    assert one.digest() == two.digest()
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))  # no progress since the sync began: weights = anchor
    assert one.drift(p1) == 0.0 and one.drift([p + 1 for p in p1]) > 0


def test_a_joiner_gets_anchor_and_momentum_but_keeps_its_own_residual():
    names = ["w", "b"]
    params = _params(4)
    donor = OuterState(params)
    donor.apply(torch.ones(sum(p.numel() for p in params)), params, [p.clone() for p in params], OuterStep(0.7, 0.9), 5)
    donor.pseudo_gradient([p + 0.3 for p in params], "int8", 3)  # a residual of its own
    shared, metadata = donor.export(names, with_residual=False)
    assert "outer/residual" not in shared
    mine = OuterState(_params(5))
    mine.residual = torch.full_like(mine.residual, 0.25)
    loaded = OuterState.load(names, _params(5), shared, metadata, residual_of=mine)
    assert loaded.digest() == donor.digest() and loaded.last_sync == 5
    assert all(torch.equal(a, b) for a, b in zip(loaded.momentum, donor.momentum))
    assert torch.equal(loaded.residual, mine.residual)
    saved, metadata = donor.export(names, with_residual=True)  # a checkpoint keeps it
    assert torch.equal(OuterState.load(names, params, saved, metadata).residual, donor.residual)
    assert OuterState.load(names, params, {"param/w": params[0]}, {}) is None  # no outer state in it
    with pytest.raises(ValueError, match="matching w"):
        OuterState.load(names, params, {**shared, "outer/anchor/w": torch.zeros(3)}, metadata)


def test_a_copy_taken_while_a_sync_is_in_flight_knows_it_lacks_that_sync():
    names = ["w", "b"]
    params = _params(4)
    donor = OuterState(params)
    _, metadata = donor.export(names, with_residual=False)
    assert "outer_pending" not in metadata
    donor.pseudo_gradient([p + 0.3 for p in params], "raw", 7)  # the sync of round 7 begins
    shared, metadata = donor.export(names, with_residual=False)
    joiner = OuterState.load(names, _params(4), shared, metadata, source="donor")
    assert (joiner.missed, joiner.missed_from) == (7, "donor")
    own = OuterState.load(names, params, *donor.export(names, with_residual=True))  # its own checkpoint
    assert (own.missed, own.missed_from) == (7, None)

    # Applying it clears the donor's; a copy taken after that lacks nothing.
    donor.apply(torch.ones(sum(p.numel() for p in params)), params, [p.clone() for p in params], OuterStep(0.7, 0.9), 7)
    assert donor.pending is None
    assert OuterState.load(names, _params(4), *donor.export(names, with_residual=False), source="donor").missed is None

    # A joiner that begins the same sync itself takes part in it; one that begins a later sync still lacks the old.
    joiner.pseudo_gradient(_params(4), "raw", 7)
    assert joiner.missed is None and joiner.pending == 7
    late = OuterState.load(names, _params(4), shared, metadata, source="donor")
    late.pseudo_gradient(_params(4), "raw", 11)
    assert late.missed == 7
