import pytest

from protocol.envelope import HopSpec
from protocol.records import NodeRecord, NodeState, PlannedMicrobatch, Reach, RecordError, RoundPlan


def record(**over):
    base = dict(peer_id="p", endpoint="127.0.0.1:5", stages=(1, 2), compute_s={1: 0.1, 2: 0.2}, memory_slots=8,
                role="stage", version="0.1.0", swarm="s", round=3, state=NodeState.SERVING, metrics_url="http://x/metrics",
                maddrs=("/ip4/1.2.3.4/tcp/1/p2p/Qm",), heartbeat_time=12.5)
    return NodeRecord(**{**base, **over})


def test_node_record_round_trip():
    r = record()
    assert NodeRecord.from_value("p", r.to_value()) == r


@pytest.mark.parametrize("mutate", [
    lambda v: v.pop("endpoint"),
    lambda v: v.update(stages=[]),
    lambda v: v.update(stages=["1"]),
    lambda v: v.update(round=True),
    lambda v: v.update(state="asleep"),
    lambda v: v.update(state=True),
    lambda v: v.update(compute_s={"x": 1}),
    lambda v: v.update(reach="teleported"),
    lambda v: v.update(reach=["direct"]),
])
def test_malformed_node_records_are_rejected(mutate):
    value = record().to_value()
    mutate(value)
    with pytest.raises(RecordError):
        NodeRecord.from_value("p", value)


def test_reach_round_trips_and_old_records_are_unchecked():
    r = record(reach=Reach.UNREACHABLE)
    assert NodeRecord.from_value("p", r.to_value()) == r
    relayed = record(reach=Reach.RELAYED, via="QmRelay")
    assert NodeRecord.from_value("p", relayed.to_value()) == relayed
    old = record().to_value()
    old.pop("reach")  # a record from before the field
    assert NodeRecord.from_value("p", old).reach is Reach.UNCHECKED


def test_only_serving_nodes_peers_can_dial_are_plannable():
    # unchecked, direct, hole-punched (no path to it yet), relayed, unreachable
    assert [record(reach=r).plannable for r in Reach] == [True, True, False, True, False]
    assert not record(state=NodeState.JOINING, reach=Reach.DIRECT).plannable


def test_plan_round_trip_and_views():
    o, a, b = HopSpec(0, "o", "h:0"), HopSpec(1, "a", "h:1"), HopSpec(2, "b", "h:2")
    plan = RoundPlan(round=4, planner="o", membership_digest="d",
                     microbatches=(PlannedMicrobatch(0, (o, a, b, o)), PlannedMicrobatch(1, (o, b, o))),
                     deadline=123.5)
    assert RoundPlan.from_value(plan.to_value()) == plan
    assert plan.participants() == {"o", "a", "b"}
    assert plan.work_of("o") == [(0, 0, 0), (1, 0, 0)]  # the origin's final hop is not separate work
    assert plan.work_of("b") == [(0, 2, 2), (1, 1, 2)]
    assert plan.replicas(1) == {"a"}


def test_malformed_plan_is_rejected():
    with pytest.raises(RecordError):
        RoundPlan.from_value({"round": 1, "planner": "o", "digest": "d", "microbatches": [{"id": 0, "path": [[0]]}]})
