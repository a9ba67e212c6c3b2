"""Hop checks (a receiver refuses implausible tensors), bans (an origin keeps reported peers out, longer at
each offence), and the `--misbehave` kinds that the checks are built against."""

from __future__ import annotations

import math
import types

import pytest
import torch

from node.faults import misbehave
from node.faults.bans import Bans
from node.stage.hop_checks import NON_FINITE, SIZE, HopChecks, Refusal
from node.stage.witness import Witness, receipt_tokens, witnessed_by_others
from protocol.generated.swarm.v1 import stage_pb2 as pb
from node.sync.outer_sync import weights_epoch
from protocol.records import MAX_WITNESSED, NodeRecord, NodeState, RecordError
from protocol.sync_names import OUTER

WARMUP = 8


def _checks(observe=lambda direction, ratio: None) -> HopChecks:
    return HopChecks(band=10.0, warmup=WARMUP, smoothing=0.05, stale_rounds=2, observe=observe)


def _take(checks: HopChecks, direction: str, stage: int, tensor: torch.Tensor, round_: int) -> None:
    """What the servicer does with a hop: check it, and learn from it once it is accepted."""
    checks.learn(checks.check(direction, stage, tensor, round_))


def _activations(seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(seed)) * scale


def test_a_hop_a_hundred_times_its_stages_size_is_refused_once_the_band_is_learned():
    observed = []
    checks = _checks(lambda direction, ratio: observed.append((direction, ratio)))
    for seed in range(WARMUP):
        _take(checks, "forward", 1, _activations(seed), 0)
    honest = _activations(100)
    _take(checks, "forward", 1, honest, 0)  # control: the same traffic passes
    with pytest.raises(Refusal) as refused:
        _take(checks, "forward", 1, misbehave.sent(misbehave.SCALE_ACTIVATIONS, "forward", honest), 0)
    assert refused.value.kind == SIZE and "stage 1" in refused.value.detail and "100x" in refused.value.detail
    with pytest.raises(Refusal):
        _take(checks, "forward", 1, misbehave.sent(misbehave.NOISE_ACTIVATIONS, "forward", honest), 0)
    with pytest.raises(Refusal):  # too small is as implausible as too large
        _take(checks, "forward", 1, honest / 100, 0)
    _take(checks, "forward", 1, _activations(101), 0)  # a refusal teaches nothing: honest traffic still passes
    # Every hop judged after the warm-up is observed (swarm_node_hop_size_ratio), refused ones too.
    assert [d for d, _ in observed] == ["forward"] * 5
    assert observed[0][1] < 1.1 and 99 < observed[1][1] < 101 and 99 < observed[3][1] < 101


def test_each_stage_has_its_own_band_and_gradients_are_observed_not_judged():
    observed = []
    checks = _checks(lambda direction, ratio: observed.append((direction, ratio)))
    for seed in range(WARMUP):
        _take(checks, "forward", 1, _activations(seed), 0)
        _take(checks, "backward", 1, _activations(seed, 1e-4), 0)  # gradients are much smaller
    _take(checks, "forward", 2, _activations(51, 30.0), 0)  # stage 2 not learned yet: warming up, accepted
    with pytest.raises(Refusal):
        _take(checks, "forward", 1, _activations(52, 30.0), 0)
    _take(checks, "backward", 1, _activations(52, 1.0), 0)  # 10^4 x: seen, not refused (their size follows the loss)
    assert observed[-1][0] == "backward" and observed[-1][1] > 1000
    bad = _activations(53, 1e-4)
    bad[0, 0, 0] = float("inf")
    with pytest.raises(Refusal):  # but never a non-finite one
        _take(checks, "backward", 1, bad, 0)


def test_a_hop_checked_but_not_accepted_teaches_nothing():
    """Forged hops the node refuses afterwards (another round, a duplicate) must not move the band: in a test,
    forged near-zero activations had taught a receiver to refuse every honest hop."""
    checks = _checks()
    for seed in range(WARMUP):
        _take(checks, "forward", 1, _activations(seed), 0)
    for seed in range(100):
        checks.check("forward", 1, _activations(seed, 0.2), 0)  # within the band, never learned
    with pytest.raises(Refusal):
        _take(checks, "forward", 1, _activations(200, 0.05), 0)  # still judged by the honest mean
    _take(checks, "forward", 1, _activations(201), 0)


def test_non_finite_values_are_refused_at_once_even_while_warming_up():
    bad = _activations(0)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(Refusal) as refused:
        _take(_checks(), "forward", 1, bad, 0)
    assert refused.value.kind == NON_FINITE


def test_the_band_follows_a_slow_honest_drift():
    """Activations grow as the model learns: a factor of 1000 over 200 hops never trips a band of 10."""
    checks = _checks()
    for i in range(200):
        _take(checks, "forward", 1, _activations(i, 10 ** (3 * i / 200)), i // 6)


def test_a_band_not_fed_for_a_few_rounds_is_learned_again():
    """A node left out of plans while the weights grew must not refuse the grown, honest activations."""
    checks = _checks()
    for seed in range(WARMUP):
        _take(checks, "forward", 0, _activations(seed), 3)
    with pytest.raises(Refusal):
        _take(checks, "forward", 0, _activations(9, 14.0), 5)  # two rounds later: still judged
    _take(checks, "forward", 0, _activations(9, 14.0), 6)  # three: learned again from here
    for seed in range(10, 10 + WARMUP):
        _take(checks, "forward", 0, _activations(seed, 14.0), 6)
    with pytest.raises(Refusal):
        _take(checks, "forward", 0, _activations(30, 14.0 * 100), 6)


def test_an_outer_step_starts_new_bands_and_late_hops_of_the_epoch_before_keep_theirs():
    """Under --sync outer every replica's weights jump at once (an outer step): hops computed after it are judged
    by a band learned after it, and the previous epoch's hops, still arriving at its end, by theirs."""
    every = 4
    plan = types.SimpleNamespace(sync=OUTER, sync_every=every)
    checks = HopChecks(band=10.0, warmup=WARMUP, smoothing=0.05, stale_rounds=2,
                       epoch=lambda round_: weights_epoch(plan, round_))
    assert [weights_epoch(plan, r) for r in range(1, 10)] == [0, 0, 0, 0, 1, 1, 1, 1, 2]  # sync rounds 3, 7
    assert weights_epoch(types.SimpleNamespace(sync="every-round", sync_every=1), 9) == 0
    for seed in range(WARMUP):
        _take(checks, "forward", 1, _activations(seed), 3)
    with pytest.raises(Refusal):  # control: the same jump inside the epoch is refused
        _take(checks, "forward", 1, _activations(20, 12.0), 4)
    for seed in range(WARMUP):  # round 5 computes after the step of round 3's sync, 12x larger: learned anew
        _take(checks, "forward", 1, _activations(30 + seed, 12.0), 5)
    _take(checks, "forward", 1, _activations(40), 4)  # a late hop of round 4: its own band still judges it
    with pytest.raises(Refusal):
        _take(checks, "forward", 1, _activations(41), 5)
    with pytest.raises(Refusal):
        _take(checks, "forward", 1, _activations(42, 12.0), 4)


def test_misbehave_kinds_change_only_their_direction_and_only_from_their_round():
    t = _activations(0)
    assert torch.equal(misbehave.sent(misbehave.FLIP_GRADIENT, "backward", t), -t)
    assert misbehave.sent(misbehave.FLIP_GRADIENT, "forward", t) is t
    assert misbehave.sent(misbehave.SCALE_ACTIVATIONS, "backward", t) is t
    assert misbehave.sent(misbehave.NONE, "forward", t) is t
    noised = misbehave.sent(misbehave.NOISE_ACTIVATIONS, "forward", t)
    ratio = (noised - t).pow(2).mean().sqrt() / t.pow(2).mean().sqrt()
    assert math.isclose(ratio.item(), misbehave.NOISE_RATIO, rel_tol=0.05)
    from node.config import FaultConfig
    config = FaultConfig(misbehave=misbehave.SCALE_ACTIVATIONS, misbehave_from=3)
    assert [config.misbehaving(r) for r in (0, 2, 3, 9)] == ["none", "none", "scale-activations", "scale-activations"]


def test_bans_double_with_each_offence_and_count_once_a_round():
    events = []
    bans = Bans(base_rounds=4, emit=lambda event, **fields: events.append((event, fields)))
    first = bans.offence("bad", 10, "checked: too large", "accuser")
    assert first.until_round == 15 and bans.offence("bad", 10, "again, same round", "other") is None
    assert bans.banned(14) == {"bad"} and bans.banned(15) == frozenset()
    second = bans.offence("bad", 15, "checked: too large", "accuser")
    assert (second.offences, second.until_round) == (2, 15 + 1 + 8)
    assert [e for e, _ in events] == ["banned", "banned"] and events[1][1]["offences"] == 2


def test_an_offence_takes_repeated_refusals_within_the_window():
    """One refused hop can be an honest outlier: only a second within two rounds makes an offence."""
    bans = Bans(base_rounds=4, refusals=2, window=2)
    assert bans.refused("peer", 10, "checked: once", "rx") is None
    assert bans.refused("peer", 12, "checked: two rounds later", "rx") is None  # the first fell out of the window
    ban = bans.refused("peer", 13, "checked: again", "rx")
    assert ban is not None and ban.offences == 1 and bans.banned(14) == {"peer"}
    assert bans.refused("peer", 13, "checked: a late hop of the same round", "rx") is None  # serving its ban
    assert bans.on_record()["peer"].offences == 1


def _record(**bans_value) -> dict:
    record = NodeRecord(peer_id="p", endpoint="127.0.0.1:1", stages=(0,), compute_s={0: 0.1}, memory_slots=4,
                        role="data", version="x", swarm="s", round=3, state=NodeState.SERVING)
    value = record.to_value()
    value["bans"] = bans_value
    return value


def test_a_records_bans_round_trip_and_malformed_ones_are_refused():
    ban = {"offences": 1, "until": 9, "reason": "checked: too large", "accuser": "q"}
    assert NodeRecord.from_value("p", _record(bad=ban)).bans == {"bad": ban}
    for broken in ({**ban, "until": "soon"}, {**ban, "extra": 1}, {**ban, "reason": "x" * 1000}, "banned"):
        with pytest.raises(RecordError):
            NodeRecord.from_value("p", _record(bad=broken))


def test_a_witness_counts_each_peers_work_and_the_others_views_add_up():
    witness = Witness(max_peers=2)
    witness.took("a", 128, judged=True)
    witness.took("a", 128, judged=False)  # accepted while its band warmed up: a hop, not a passed check
    witness.refused("a")
    witness.took("b", 64, judged=True)
    assert witness.snapshot() == {"a": {"hops": 2, "tokens": 256, "passed": 1, "failed": 1},
                                  "b": {"hops": 1, "tokens": 64, "passed": 1, "failed": 0}}
    witness.took("a", 128, judged=True)
    witness.took("c", 32, judged=True)  # room for two peers: b, seen longest ago, is forgotten
    assert set(witness.snapshot()) == {"a", "c"}
    # status adds up what the others saw; a node's view of itself counts for nothing.
    views = {"x": witness.snapshot(), "a": {"a": {"hops": 99, "tokens": 99, "passed": 99, "failed": 0},
                                            "c": {"hops": 1, "tokens": 32, "passed": 0, "failed": 2}}}
    assert witnessed_by_others(views) == {"a": {"hops": 3, "tokens": 384, "passed": 2, "failed": 1},
                                          "c": {"hops": 2, "tokens": 64, "passed": 1, "failed": 2}}


def test_a_receipt_counts_only_the_tokens_the_hop_carried():
    hop = torch.zeros(4, 32, 64)
    assert receipt_tokens(pb.Ack(queued=0, tokens=128, checked=True), hop) == 128
    for lie in (0, 127, 10**9, -5):  # an older receiver (no receipt), a short count, an inflated or negative one
        assert receipt_tokens(pb.Ack(queued=0, tokens=lie), hop) is None


def test_a_records_witnessed_work_round_trips_and_malformed_ones_are_refused():
    work = {"hops": 3, "tokens": 96, "passed": 2, "failed": 0}
    value = _record()
    value["witnessed"] = {"q": work}
    assert NodeRecord.from_value("p", value).witnessed == {"q": work}
    for broken in ({"q": {**work, "hops": -1}}, {"q": {**work, "failed": True}}, {"q": {**work, "extra": 1}},
                   {"q": [3, 96]}, {f"q{i}": work for i in range(MAX_WITNESSED + 1)}, ["q"]):
        value["witnessed"] = broken
        with pytest.raises(RecordError):
            NodeRecord.from_value("p", value)


def test_only_an_activation_judged_against_a_learned_band_counts_as_a_passed_check():
    checks = _checks()
    samples = [checks.check("forward", 1, _activations(seed), 0) for seed in range(WARMUP)]
    for sample in samples:
        checks.learn(sample)
    assert not any(s.judged for s in samples)  # warming up
    assert checks.check("forward", 1, _activations(50), 0).judged
    assert not checks.check("backward", 1, _activations(51), 0).judged  # gradients are observed only


def _origin_faults():
    """A data node's fault component with one open microbatch, round 3, path me -> b -> c -> me."""
    import threading
    from types import SimpleNamespace

    from node.config import FaultConfig
    from node.faults.faults import Faults
    from node.host.metrics import NodeMetrics
    from node.stage.origin import OriginBook
    from protocol.envelope import HopSpec

    book = OriginBook(tokens_per_microbatch=4)
    book.open_round(None, deadline=float("inf"), stop=threading.Event(), keep_logits=False)
    book.add(3, 0, torch.zeros(1, 4, dtype=torch.long),
             [HopSpec(0, "me", "m:1"), HopSpec(1, "b", "b:1"), HopSpec(2, "c", "c:1"), HopSpec(0, "me", "m:1")])
    events = []
    faults = Faults(FaultConfig(ban_rounds=4), "s", "me", clients=None, signer=None, metrics=NodeMetrics(),
                    executor=SimpleNamespace(round=3), activation_bytes=1, members=dict, join_timeout=1.0,
                    emit=lambda event, **fields: events.append(fields), book=book, restart=lambda *a: None)
    return faults, events


def _accusation(failed_peer: str):
    from protocol.generated.swarm.v1 import stage_pb2 as pb

    # attempt 9: not the microbatch's current attempt, so nothing is re-routed here (only the ban is tested)
    return pb.FailureReport(swarm_id="s", round=3, microbatch=0, attempt=9, failed_peer=failed_peer,
                            reason="checked: forward hop from stage 1 has RMS 40, 377x the 0.11 this node sees")


def test_an_origin_bans_the_peer_a_receiver_on_the_path_accuses_and_only_that():
    import grpc

    from protocol.errors import ProtocolError

    faults, events = _origin_faults()
    try:
        faults.on_failure_report(_accusation("b"), sender="c")
        assert faults.bans.banned(4) == frozenset()  # one refused hop: not yet an offence
        faults.on_failure_report(_accusation("b"), sender="c")
        assert faults.bans.banned(4) == {"b"} and events[0]["accuser"] == "c"
        for failed_peer, sender in (("d", "c"), ("b", "stranger"), ("c", "c")):  # off the path, or itself
            with pytest.raises(ProtocolError) as refused:
                faults.on_failure_report(_accusation(failed_peer), sender=sender)
            assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert faults.bans.banned(4) == {"b"}
        # Accusing the origin, which knows its own hop: nobody is banned (a band can be honestly wrong).
        faults.on_failure_report(_accusation("me"), sender="c")
        assert faults.bans.banned(4) == {"b"} and len(events) == 1
        assert faults.metrics.accusations._value.get() == 3
    finally:
        faults.close()


def test_a_ban_never_takes_a_stages_last_replica_out_of_plans():
    """One receiver's accusation must not stop the swarm: a banned peer stays planned while it is the only
    replica of a stage (its hops are still checked), and is left out once another replica serves."""
    from dataclasses import replace

    from node.control.planning import without_banned

    base = NodeRecord(peer_id="", endpoint="127.0.0.1:1", stages=(0,), compute_s={0: 0.1}, memory_slots=4,
                      role="data", version="x", swarm="s", round=3, state=NodeState.SERVING)
    members = {p: replace(base, peer_id=p, stages=(stage,)) for p, stage in
               (("data", 0), ("s1a", 1), ("s1b", 1), ("s2", 2))}
    assert set(without_banned(members, frozenset({"s1b"}), 3)) == {"data", "s1a", "s2"}
    assert set(without_banned(members, frozenset({"s1a", "s1b", "s2"}), 3)) == set(members)
    assert set(without_banned(members, frozenset({"s2", "s1b"}), 3)) == {"data", "s1a", "s2"}
