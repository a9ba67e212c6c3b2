"""The replicas' gradient exchange, three replicas on three gRPC servers in this process: every-round
(reduce-scatter, then all-gather) and all-to-all give the float64 mean, and move the bytes they should."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from dataclasses import replace

import grpc
import pytest
import torch

from node.dataplane.transport import StageClients
from node.host.metrics import NodeMetrics
from node.host.rpc_guard import RpcGuard
from node.sync.averaging import Contribution, GradientExchange, outliers
from protocol.generated.swarm.v1 import stage_pb2_grpc as pb_grpc
from protocol.limits import WireLimits
from protocol.service import stage_service_handler
from protocol.sync_names import ALL_TO_ALL, EVERY_ROUND

NAMES = ["w", "b"]
SHAPES = [(300, 100), (700,)]
G = 4 * sum(torch.Size(s).numel() for s in SHAPES)  # bytes of one replica's gradients


class _Servicer(pb_grpc.StageServiceServicer):
    def __init__(self, exchange: GradientExchange):
        self.exchange = exchange

    def FetchGradients(self, request, context):
        yield from self.exchange.serve(request, NAMES, context.time_remaining() or 10, lambda: not context.is_active())


class _Replica:
    def __init__(self, peer_id: str, outlier_ratio: float = math.inf, refused=lambda reason: None):
        self.peer_id = peer_id
        self.received: Counter = Counter()  # method -> bytes this replica's client received
        self.server = grpc.server(ThreadPoolExecutor(8), interceptors=[RpcGuard(NodeMetrics())])  # as a node's
        self.endpoint = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.clients = StageClients(WireLimits(), meter=self._count)
        self.exchange = GradientExchange("s", peer_id, self.clients, chunk_bytes=64 * 1024, recheck_s=0.05,
                                         refused=refused, outlier_ratio=outlier_ratio)
        self.server.add_generic_rpc_handlers((stage_service_handler(_Servicer(self.exchange)),))
        self.server.start()

    def _count(self, direction: str, method: str, nbytes: int) -> None:
        if direction == "received":
            self.received[method] += nbytes

    def close(self):
        self.clients.close()
        self.server.stop(0)


@pytest.fixture
def replicas():
    group = [_Replica(f"peer-{k}") for k in range(3)]
    yield group
    for r in group:
        r.close()


def _contribution(seed: int, count: int) -> Contribution:
    gen = torch.Generator().manual_seed(seed)
    return Contribution([torch.randn(s, generator=gen) for s in SHAPES], count, f"digest-{seed}")


def _average_all(group, strategy: str, round_: int, mine: dict, skip: set = frozenset()) -> dict:
    endpoints = {r.peer_id: r.endpoint for r in group}
    out = {}

    def run(r):
        out[r.peer_id] = r.exchange.average(1, round_, NAMES, mine[r.peer_id], endpoints, time.monotonic() + 10,
                                            threading.Event(), strategy=strategy)
    threads = [threading.Thread(target=run, args=(r,)) for r in group if r.peer_id not in skip]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


@pytest.mark.parametrize("strategy, expected_bytes", [(EVERY_ROUND, 2 * G * 2 / 3), (ALL_TO_ALL, 2 * G)],
                         ids=[EVERY_ROUND, ALL_TO_ALL])
def test_both_strategies_give_the_float64_mean_and_move_their_bytes(replicas, strategy, expected_bytes):
    mine = {r.peer_id: _contribution(k, count=k + 1) for k, r in enumerate(replicas)}
    averaged = _average_all(replicas, strategy, 5, mine)
    total = sum(c.count for c in mine.values())
    for i in range(len(SHAPES)):
        exact = sum(mine[p].grads[i].double() for p in sorted(mine)) / total
        for result in averaged.values():
            assert torch.equal(result.grads[i], exact.float())  # bit-identical on every replica
    assert all(a.total == total and set(a.peers) == set(mine) for a in averaged.values())
    for r in replicas:  # from the frames each replica's client received
        assert abs(r.received["FetchGradients"] - expected_bytes) <= 0.1 * expected_bytes, (r.received, expected_bytes)


def test_a_replica_that_never_posts_is_left_out_and_the_others_agree(replicas):
    mine = {r.peer_id: _contribution(k, count=2) for k, r in enumerate(replicas)}
    gone = replicas[1].peer_id  # owns the middle shard, and never averages it
    replicas[1].close()
    averaged = _average_all(replicas, EVERY_ROUND, 6, mine, skip={gone})
    exact = [(mine["peer-0"].grads[i].double() + mine["peer-2"].grads[i].double()) / 4 for i in range(len(SHAPES))]
    for result in averaged.values():
        assert set(result.peers) == {"peer-0", "peer-2"} and result.total == 4
        assert all(torch.equal(g, e.float()) for g, e in zip(result.grads, exact))


def test_malformed_shard_requests_are_refused_with_a_reason(replicas):
    from protocol.generated.swarm.v1 import stage_pb2 as pb
    stub = replicas[0].clients.stub(replicas[1].endpoint, receiver=replicas[1].peer_id)
    for request, word in [(pb.GradientRequest(stage=1, round=1, shard=3, shards=3), "shard 3 of 3"),
                          (pb.GradientRequest(stage=1, round=1, shards=5000), "1..1024"),
                          (pb.GradientRequest(stage=1, round=1, averaged=True), "averaged")]:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.FetchGradients(request, timeout=5))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and word in e.value.details(), e.value.details()


def test_the_last_replica_standing_steps_on_its_own_gradients(replicas):
    pair = replicas[:2]
    mine = {r.peer_id: _contribution(k, count=3) for k, r in enumerate(pair)}
    pair[1].close()  # owns shard 1 and never averages it; nobody else is left to pull from
    averaged = _average_all(pair, EVERY_ROUND, 7, mine, skip={pair[1].peer_id})
    result = averaged[pair[0].peer_id]
    assert set(result.peers) == {pair[0].peer_id} and result.total == 3
    assert all(torch.equal(g, (m.double() / 3).float()) for g, m in zip(result.grads, mine[pair[0].peer_id].grads))


def test_a_replica_without_a_group_steps_on_its_own_mean(replicas):
    solo = replicas[0]
    mine = _contribution(9, count=4)
    result = solo.exchange.average(1, 8, NAMES, mine, {solo.peer_id: solo.endpoint}, time.monotonic() + 5,
                                   threading.Event())
    assert result.total == 4 and all(torch.equal(g, (m.double() / 4).float()) for g, m in zip(result.grads, mine.grads))


def test_coded_shards_give_every_replica_the_same_average_of_what_travelled(replicas):
    """int8 (outer's pseudo-gradients): bit-identical results on every replica, equal to the float64 mean of the
    decoded contributions (then coded once more by each shard's owner), for about a quarter of raw's bytes."""
    from node.sync.averaging import ALIGN, roundtrip, shard_bounds

    mine = {r.peer_id: replace(_contribution(k, count=1), codec="int8") for k, r in enumerate(replicas)}
    averaged = _average_all(replicas, EVERY_ROUND, 9, mine)
    flat = {p: torch.cat([g.reshape(-1) for g in c.grads]) for p, c in mine.items()}
    exact = sum(roundtrip(flat[p], "int8").double() for p in sorted(flat)) / 3
    bounds = shard_bounds(exact.numel(), 3, ALIGN)
    expected = torch.cat([roundtrip(exact[a:b].float(), "int8") for a, b in bounds])
    results = [torch.cat([g.reshape(-1) for g in a.grads]) for a in averaged.values()]
    assert all(torch.equal(r, expected) for r in results)
    assert float((expected - exact.float()).abs().max()) < 0.05  # int8's error, not garbage
    coded = 2 * G * (1 + 4 / 64) / 4 * 2 / 3
    for r in replicas:
        assert abs(r.received["FetchGradients"] - coded) <= 0.1 * coded, (r.received, coded)


def test_a_coded_shard_that_does_not_decode_is_left_out(replicas):
    """A payload of the wrong size, or with non-finite scales, is refused by the puller and counted."""
    from node.sync.averaging import _decoded

    for tensors, metadata, word in [({"payload": torch.zeros(7, dtype=torch.uint8)}, {"codec": "int8"}, "bytes"),
                                    ({"payload": torch.zeros(8, dtype=torch.uint8)}, {"codec": "lowrank"}, "sync"),
                                    ({"values": torch.zeros(3, dtype=torch.float64)}, {}, "float32")]:
        with pytest.raises(ValueError, match=word):
            _decoded(tensors, metadata, 4)
    scales = torch.tensor([float("inf")], dtype=torch.float32).view(torch.uint8)
    with pytest.raises(ValueError, match="finite"):
        _decoded({"payload": torch.cat([scales, torch.zeros(4, dtype=torch.uint8)])}, {"codec": "int8"}, 4)


def test_a_huge_contribution_is_left_out_by_every_replica_and_without_the_rule_it_swings_the_mean():
    counted = []
    ruled = [_Replica(f"peer-{k}", outlier_ratio=10.0, refused=counted.append) for k in range(3)]
    unruled = [_Replica(f"peer-{k}") for k in range(3)]
    try:
        mine = {f"peer-{k}": _contribution(k, count=2) for k in range(3)}
        mine["peer-2"] = Contribution([g * 1e4 for g in mine["peer-2"].grads], 2, mine["peer-2"].digest)
        expected = [(mine["peer-0"].grads[i].double() + mine["peer-1"].grads[i].double()) / 4
                    for i in range(len(SHAPES))]
        for round_, strategy in enumerate((EVERY_ROUND, ALL_TO_ALL)):
            counted.clear()
            out = _average_all(ruled, strategy, round_=round_, mine=mine)
            for r in ruled:  # the huge one too: it runs the same rule
                assert all(torch.allclose(g.double(), e, atol=1e-6) for g, e in zip(out[r.peer_id].grads, expected))
                assert [g.tolist() for g in out[r.peer_id].grads] == [g.tolist() for g in out["peer-0"].grads]
            assert counted and set(counted) == {"outlier"}, (strategy, counted)
        # The control: without the rule the huge contribution is most of the mean.
        out = _average_all(unruled, EVERY_ROUND, round_=0, mine=mine)
        assert sum(float(g.norm()) for g in out["peer-0"].grads) > 100 * sum(float(e.norm()) for e in expected)
    finally:
        for r in ruled + unruled:
            r.close()


def test_outliers_need_three_contributions_and_a_median_to_be_far_from():
    assert outliers({"a": 1.0, "b": 1e6}, 10) == set()  # two: which one is wrong?
    assert outliers({"a": 1.0, "b": 2.0, "c": 25.0}, 10) == {"c"}
    assert outliers({"a": 1.0, "b": 2.0, "c": 19.0}, 10) == set()  # within 10x the median (2)
