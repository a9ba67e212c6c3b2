"""Swarm-wide codec agreement: records publish preferences, the planner picks one codec per direction,
plans carry it, senders look it up by round, and hops are priced by encoded bytes."""

import argparse

import pytest

from node.dataplane.codec_agreement import RoundCodecs, agree, hop_bytes
from node.config import add_node_arguments, load_config
from node.errors import UsageError
from protocol.codec_names import CODEC_NAMES
from protocol.envelope import HopSpec
from protocol.records import NodeRecord, NodeState, PlannedMicrobatch, RecordError, RoundPlan


def record(peer: str, codecs=("raw", "raw"), speaks=CODEC_NAMES) -> NodeRecord:
    return NodeRecord(peer_id=peer, endpoint="127.0.0.1:1", stages=(0,), compute_s={0: 0.1}, memory_slots=4,
                      role="data", version="0.1.0", swarm="s", round=0, state=NodeState.SERVING, codecs=codecs,
                      speaks=speaks)


def test_the_majority_preference_wins_per_direction():
    members = {p: record(p, c) for p, c in
               [("a", ("int8", "bf16")), ("b", ("int8", "bf16")), ("c", ("raw", "int4"))]}
    assert agree(members) == ("int8", "bf16")
    # A tie goes to the more exact codec.
    assert agree({"a": record("a", ("int4", "raw")), "b": record("b", ("int8", "bf16"))}) == ("int8", "raw")
    assert agree({}) == ("raw", "raw")


def test_a_codec_some_member_cannot_decode_is_never_chosen():
    members = {"a": record("a", ("lowrank", "int8")), "b": record("b", ("lowrank", "int8")),
               "old": record("old", speaks=("raw",))}  # e.g. a node of an older version
    assert agree(members) == ("raw", "raw")
    members["old"] = record("old", speaks=("raw", "int8"))
    assert agree(members) == ("raw", "int8")


def test_records_and_plans_carry_codecs():
    r = record("a", ("int8", "bf16"))
    assert NodeRecord.from_value("a", r.to_value()) == r
    value = r.to_value()
    del value["codecs"], value["speaks"]  # a record from before codecs: raw only
    old = NodeRecord.from_value("a", value)
    assert old.codecs == ("raw", "raw") and old.speaks == ("raw",)
    o = HopSpec(0, "o", "h:0")
    plan = RoundPlan(round=1, planner="o", membership_digest="d", microbatches=(PlannedMicrobatch(0, (o, o)),),
                     codecs=("lowrank", "int8"))
    assert RoundPlan.from_value(plan.to_value()) == plan
    value = plan.to_value()
    value["codecs"] = ["zstd", "raw"]  # a plan this node could not follow is not a plan
    with pytest.raises(RecordError, match="zstd"):
        RoundPlan.from_value(value)
    value = plan.to_value()
    del value["codecs"]
    assert RoundPlan.from_value(value).codecs == ("raw", "raw")


def test_senders_use_their_rounds_codecs():
    codecs = RoundCodecs()
    assert codecs.for_hop(0, "forward") == "raw"
    codecs.use(3, ("int8", "bf16"))
    codecs.use(4, ("int4", "raw"))
    assert (codecs.for_hop(3, "forward"), codecs.for_hop(3, "backward")) == ("int8", "bf16")
    assert codecs.for_hop(4, "forward") == "int4" and codecs.for_hop(5, "backward") == "raw"


def test_hops_are_priced_by_encoded_bytes():
    shape, raw = (4, 64, 64), 4 * 64 * 64 * 4
    assert hop_bytes("raw", shape, raw) == raw
    assert hop_bytes("bf16", shape, raw) == raw // 2
    assert raw / hop_bytes("int8", shape, raw) > 3.7 and raw / hop_bytes("lowrank", shape, raw) > 7.5


def test_codec_options():
    parser = argparse.ArgumentParser()
    add_node_arguments(parser)
    config = load_config(parser.parse_args(["--new-swarm", "--activation-codec", "int8"]),
                         {"SWARM_NODE_GRADIENT_CODEC": "bf16"})
    assert (config.dataplane.activation_codec, config.dataplane.gradient_codec) == ("int8", "bf16")
    with pytest.raises(UsageError, match="--activation-codec = 'zstd': must be one of raw, bf16, int8, int4, lowrank"):
        load_config(parser.parse_args(["--new-swarm", "--activation-codec", "zstd"]), {})
