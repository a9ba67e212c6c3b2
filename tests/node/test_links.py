"""Measured links, their DHT record, link emulation (on a gRPC server in this process), and planning from them."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import pytest

from node.config import LinkConfig
from node.dataplane.link_emulation import EmulationError, LinkEmulator
from node.dataplane.transport import StageClients
from node.control.links import LinkMeter
from node.control.planning import DEFAULT_LINK, from_wire, live_problem, plan_round, predict_sync, wire_ratio
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.generated.swarm.v1 import stage_pb2_grpc as pb_grpc
from protocol.limits import WireLimits
from protocol.records import LinkEstimate, LinksRecord, NodeRecord, NodeState, RecordError
from protocol.service import stage_service_handler
from routing.constraints import check_plan
from tests.helpers import run_cli


def _record(peer: str, stage: int, compute: float = 0.01) -> NodeRecord:
    return NodeRecord(peer_id=peer, endpoint=f"127.0.0.1:{1000 + len(peer)}{stage}", stages=(stage,),
                      compute_s={stage: compute}, memory_slots=4, role="data" if stage == 0 else "stage",
                      version="t", swarm="s", round=0, state=NodeState.SERVING)


MEMBERS = {p: _record(p, s) for p, s in [("d0", 0), ("d1", 0), ("a1", 1), ("b1", 1), ("s2", 2), ("s3", 3)]}


def test_links_record_skips_and_counts_malformed_entries():
    value = LinksRecord("a", {"b": LinkEstimate(0.01, 1e8)}, 5.0).to_value()
    value["to"]["c"] = ["fast", 1]
    value["to"]["d"] = [0.1]
    record, skipped = LinksRecord.from_value("a", value)
    assert record.to == {"b": LinkEstimate(0.01, 1e8)} and skipped == 2
    with pytest.raises(RecordError):
        LinksRecord.from_value("a", ["not", "a", "map"])


def test_meter_smooths_and_removes_latency():
    meter = LinkMeter("me", LinkConfig())
    meter.observe_rtt("x", 0.2)
    assert meter.estimates()["x"].bandwidth_Bps == 0.0  # no large hop yet: planners use their default
    meter.observe_send("x", 1_000_000, 0.1 + 1.0 + 0.1)  # latency 0.1 s, 1 MB at 1 MB/s, the ack's 0.1 s back
    estimate = meter.estimates()["x"]
    assert (estimate.rtt_s, estimate.bandwidth_Bps) == pytest.approx((0.2, 1e6))
    meter.observe_rtt("x", 0.4)
    assert 0.2 < meter.estimates()["x"].rtt_s < 0.4  # EWMA, not the last sample


def test_absent_and_absurd_estimates_fall_back_to_the_default():
    links = {("d0", "a1"): LinkEstimate(-1.0, 1e8), ("a1", "b1"): LinkEstimate(0.01, 0.0),
             ("d1", "b1"): LinkEstimate(0.5, 1e6)}
    live = live_problem(MEMBERS, links, num_stages=4, visits=3, microbatches_per_origin=2, activation_bytes=10**5)
    p, idx = live.problem, live.problem.index
    assert p.link_s[idx("d0/0"), idx("a1/1")] == pytest.approx(DEFAULT_LINK.rtt_s / 2 + 1e5 / DEFAULT_LINK.bandwidth_Bps)
    assert p.link_s[idx("a1/1"), idx("b1/1")] == pytest.approx(0.005 + 1e5 / DEFAULT_LINK.bandwidth_Bps)  # RTT kept
    assert p.link_s[idx("d1/0"), idx("b1/1")] == pytest.approx(0.25 + 0.1)
    assert live.defaulted_links == 15 - 2  # every pair but the two usable RTTs


@pytest.mark.parametrize("visits", [3, 4])
def test_every_plan_comes_from_routing_and_round_trips(visits):
    made = plan_round(MEMBERS, {}, round_=3, num_stages=4, visits=visits, microbatches_per_origin=3,
                      activation_bytes=10**5, planner="d0")
    assert made is not None
    wire, live = made
    assert wire.predicted_s > 0
    assert all(len(mb.path) == visits + 1 for mb in wire.microbatches)
    if visits == 4:  # a full pipeline: stages in order
        assert all([h.stage for h in mb.path] == [0, 1, 2, 3, 0] for mb in wire.microbatches)
    plan = from_wire(live.problem, wire)
    assert check_plan(live.problem, plan) == []


def test_the_sync_is_priced_over_the_measured_links_of_each_replica_group():
    links = {("d0", "d1"): LinkEstimate(0.02, 1e7), ("a1", "b1"): LinkEstimate(0.2, 1e6),
             ("b1", "a1"): LinkEstimate(0.2, 1e6)}
    plan, _ = plan_round(MEMBERS, links, round_=0, num_stages=4, visits=4, microbatches_per_origin=2,
                         activation_bytes=10**5, planner="d0")
    grads = [4e6, 2e6, 1e6, 1e6]  # stages 2 and 3 have one replica each: nothing to sync
    # stage 1's pair is the slowest: each pull pays the RTT and its bytes (half of G per phase, two phases)
    assert predict_sync(plan, links, grads, "raw") == pytest.approx(2 * (0.2 + 1e6 / 1e6))
    assert predict_sync(replace(plan, sync="all-to-all"), links, grads, "raw") == pytest.approx(0.2 + 2e6 / 1e6)
    outer = replace(plan, sync="outer", sync_every=4, predicted_s=0.5)
    int8 = 2 * (0.2 + 2e6 * wire_ratio("int8") / 2 / 1e6)
    assert predict_sync(outer, links, grads, "int8") == pytest.approx((int8 - 0.5) / 4)
    assert (wire_ratio("raw"), wire_ratio("bf16"), wire_ratio("int8")) == pytest.approx((1, 0.5, 1.0625 / 4))


def test_emulator_delays_by_latency_and_bytes(tmp_path):
    spec = {"nodes": [{"endpoint": "h:1", "location": "A"}, {"endpoint": "h:2", "location": "B"}],
            "links": [{"a": "A", "b": "B", "latency_ms": 100, "bandwidth_GiBps": 1 / 1024}],  # 1 MiB/s
            "same_location_link": {"latency_ms": 0, "bandwidth_GiBps": 10}}
    emulator = LinkEmulator.from_dict(spec)
    emulator.bind("h:1")
    started = time.monotonic()
    assert list(emulator.frames("h:2", [b"x" * 100_000, b"y" * 100_000])) == [b"x" * 100_000, b"y" * 100_000]
    assert 0.1 + 200_000 / 2**20 <= time.monotonic() - started < 0.6
    started = time.monotonic()
    list(emulator.frames("unknown:9", [b"z" * 100_000]))
    assert time.monotonic() - started < 0.05


class _StateServer(pb_grpc.StageServiceServicer):
    """Streams STATE_BYTES of stage state in 64 KiB chunks, and answers Ping."""

    def Ping(self, request, context):
        return pb.PingReply(peer_id="peer")

    def FetchState(self, request, context):
        for offset in range(0, STATE_BYTES, 64 * 1024):
            yield pb.StateChunk(data=bytes(min(64 * 1024, STATE_BYTES - offset)))


STATE_BYTES = 300_000


def test_every_call_pays_the_emulated_link_both_ways():
    """Requests wait on the link to the peer, answers on the link back: a state transfer takes the link's
    time for its bytes, a Ping two latencies. Without emulation the same calls take a fraction of that."""
    server = grpc.server(ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((stage_service_handler(_StateServer()),))
    endpoint = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    spec = {"nodes": [{"endpoint": "me:1", "location": "A"}, {"endpoint": endpoint, "location": "B"}],
            "links": [{"a": "A", "b": "B", "latency_ms": 100, "bandwidth_GiBps": 1 / 1024}],  # 1 MiB/s
            "same_location_link": {"latency_ms": 0, "bandwidth_GiBps": 10}}
    emulator = LinkEmulator.from_dict(spec)
    emulator.bind("me:1")
    timed = {}
    for name, clients in (("emulated", StageClients(WireLimits(), emulator=emulator)),
                          ("direct", StageClients(WireLimits()))):
        try:
            started = time.monotonic()
            chunks = list(clients.stub(endpoint, receiver="peer").FetchState(pb.StateRequest(), timeout=10))
            timed[name, "state"] = time.monotonic() - started
            assert sum(len(c.data) for c in chunks) == STATE_BYTES
            started = time.monotonic()
            clients.ping(endpoint, timeout=10)
            timed[name, "ping"] = time.monotonic() - started
        finally:
            clients.close()
    server.stop(0)
    assert timed["emulated", "state"] >= 0.1 + STATE_BYTES / 2**20, timed
    assert timed["emulated", "ping"] >= 2 * 0.1, timed
    assert timed["direct", "state"] < 0.5 * timed["emulated", "state"], timed


@pytest.mark.parametrize("spec, message", [
    ({"nodes": []}, "needs 'nodes' and 'links'"),
    ({"nodes": [{"location": "A"}], "links": []}, "no node has an 'endpoint'"),
    ({"nodes": [{"endpoint": "h:1", "location": "A"}, {"endpoint": "h:2", "location": "B"}], "links": []},
     "no link between regions"),
    ({"nodes": [{"endpoint": "h:1", "location": "A"}], "links": [{"a": "A", "b": "B", "latency_ms": -1,
                                                                   "bandwidth_GiBps": 1}]}, "latency_ms must be"),
])
def test_malformed_emulation_files_are_refused(spec, message):
    with pytest.raises(EmulationError, match=message):
        LinkEmulator.from_dict(spec)


def test_a_malformed_emulation_file_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "links.json"
    bad.write_text(json.dumps({"nodes": [{"endpoint": "h:1", "location": "A"}], "links": [{"a": "A"}]}))
    r = run_cli("run", "--new-swarm", "--emulate-links", str(bad))
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--emulate-links" in r.stderr, r.stderr


def test_members_that_cannot_receive_hops_are_left_out_of_plans():
    from dataclasses import replace

    from node.control.planning import choose_planner, missing_stages
    from protocol.records import Reach

    members = {**MEMBERS, "b1": replace(MEMBERS["b1"], reach=Reach.UNREACHABLE),
               "d0": replace(MEMBERS["d0"], reach=Reach.HOLE_PUNCHED),  # reserved: nothing reaches it that way
               "a1": replace(MEMBERS["a1"], reach=Reach.RELAYED, via="s2")}  # reached at its relay: planned
    wire, _ = plan_round(members, {}, round_=3, num_stages=4, visits=4, microbatches_per_origin=3,
                         activation_bytes=10**5, planner="d1")
    assert wire.participants() == {"d1", "a1", "s2", "s3"}
    assert choose_planner(members) == "d1"  # an origin that cannot be sent its hops back plans nothing either
    only = {**members, "s3": replace(MEMBERS["s3"], reach=Reach.UNREACHABLE)}
    assert missing_stages(only, 4) == [3]
    assert plan_round(only, {}, round_=3, num_stages=4, visits=4, microbatches_per_origin=3,
                      activation_bytes=10**5, planner="d1") is None
