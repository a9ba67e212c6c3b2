"""A real swarm on loopback: separate `swarm-node run` processes, the hivemind DHT with its p2pd, gRPC.

One swarm serves the whole module, in order: it trains, a node joins, a node is killed, malformed
RPCs arrive, a node leaves with SIGTERM, and finally everything stops with nothing left running. A real
Prometheus scrapes it on the way.
It trains with int8 activations and bf16 gradients, agreed through the plan although one node prefers raw.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request

import grpc
import pytest
import torch

from node.process.local_swarm import LocalSwarm
from protocol.envelope import HopSpec, make_envelope
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.generated.swarm.v1 import stage_pb2_grpc as pb_grpc
from protocol.codecs import wire_bytes
from protocol.service import KINDS, StageStub
from protocol.limits import WireLimits
from protocol.tensor_frames import encode_frames
from tests.helpers import (alive, descendants, free_port, metric_sums, metrics_text, node, rounds, run_cli, sample,
                           scrape, wait_for)

pytestmark = pytest.mark.slow

SWARM = "test-swarm"
HIDDEN = 64  # the tiny preset
COMMON = ["--num-stages", "3", "--torch-threads", "1", "--device", "cpu", "--microbatches", "3",
          "--round-timeout", "20", "--heartbeat-interval", "1", "--record-ttl", "30", "--log-level", "info",
          "--activation-codec", "int8", "--gradient-codec", "bf16"]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    swarm = LocalSwarm(tmp_path_factory.mktemp("swarm"), SWARM, common_args=COMMON)
    first = swarm.start_node("data0", "0")
    swarm.wait_started([first], timeout=120)
    peers = swarm.initial_peers()
    rest = [swarm.start_node(name, stage, initial_peers=peers, extra=extra)
            for name, stage, extra in [("s1a", "1", []), ("s1b", "1", ["--activation-codec", "raw"]),  # outvoted
                                       ("s2a", "2", [])]]
    swarm.wait_started(rest, timeout=180)
    yield swarm
    swarm.stop()


def status(swarm) -> dict[str, dict]:
    result = run_cli("status", "--swarm", SWARM, "--json", "--initial-peers", *swarm.initial_peers())
    assert result.returncode == 0, result.stderr
    return {row["peer"]: row for row in json.loads(result.stdout)["nodes"]}


def test_trains_and_replicas_agree(swarm):
    data = node(swarm, "data0")
    wait_for(lambda: len(rounds(data)) >= 5, 180, "5 rounds on the data node")
    losses = [rounds(data)[r]["loss"] for r in sorted(rounds(data))]
    assert losses[4] < losses[0], losses
    # A replica that was still joining when the swarm started copies its state first, then trains.
    wait_for(lambda: len(set(rounds(node(swarm, "s1a"))) & set(rounds(node(swarm, "s1b")))) >= 3, 180,
             "3 rounds that both stage-1 replicas trained")
    a, b = rounds(node(swarm, "s1a")), rounds(node(swarm, "s1b"))
    both = sorted(set(a) & set(b))
    for r in both:  # bit-identical replicas after every step they both took
        assert a[r]["digests"]["1"] == b[r]["digests"]["1"], f"stage 1 replicas differ after round {r}"
        assert a[r]["averaged_with"]["1"] == 2
    # Every node of every round used the plan's codecs: int8 forward, bf16 backward.
    assert all(e["codecs"] == ["int8", "bf16"] for n in swarm.nodes for e in n.events("round"))
    result = run_cli("status", "--swarm", SWARM, "--json", "--initial-peers", *swarm.initial_peers())
    shown = json.loads(result.stdout)
    assert (shown["codecs"]["activation"], shown["codecs"]["gradient"]) == ("int8", "bf16")
    assert sorted(row["codecs"] for row in shown["nodes"]) == ["int8/bf16"] * 3 + ["raw/bf16"]
    # And the bytes counted from the frames on the wire are the codecs' sizes: stage 2 sends int8 activations
    # and bf16 gradients (raw would be 4 bytes an element), plus each hop's envelope.
    s2 = node(swarm, "s2a")
    values, sent = metric_sums(s2), _bytes_by_kind(s2, "sent")
    fwd, bwd = values["swarm_node_microbatches_forwarded_total"], values["swarm_node_microbatches_backwarded_total"]
    shape = (4, 64, HIDDEN)  # --batch-size 4, --seq-len 64 (the defaults)
    int8, bf16 = wire_bytes("int8", shape, 4), wire_bytes("bf16", shape, 4)
    in_flight = 3  # --microbatches: hops computed but not yet sent when the counters were read
    assert fwd >= 5
    assert (fwd - in_flight) * int8 + (bwd - in_flight) * bf16 <= sent["activations"], (sent, fwd, bwd)
    assert sent["activations"] <= fwd * (int8 + HOP_OVERHEAD) + bwd * (bf16 + HOP_OVERHEAD), (sent, fwd, bwd)
    # Stage 1's two replicas sync every round (the every-round default: reduce-scatter, then all-gather), each
    # receiving 2G(n-1)/n = G bytes a round for G bytes of gradients, counted from the frames (the round event
    # and the gauge report them); stage 2 has no replica and pulls none.
    for r in both:
        assert a[r]["sync"] == "every-round"
        received = a[r]["sync_bytes"]["1"]
        assert abs(received - STAGE1_GRAD_BYTES) <= 0.1 * STAGE1_GRAD_BYTES, (r, received, STAGE1_GRAD_BYTES)
    assert sample(node(swarm, "s1a"), 'swarm_node_sync_bytes{stage="1"}') == pytest.approx(STAGE1_GRAD_BYTES, rel=0.1)
    assert all(e["sync_bytes"]["2"] == 0 for e in rounds(s2).values())
    assert _bytes_by_kind(s2, "received")["sync"] == 0


def _stage_gradient_bytes(stage: int, num_stages: int) -> int:
    from lm.build import build_stage
    from lm.presets import resolve_model

    module = build_stage(resolve_model("tiny"), stage, num_stages)
    return sum(4 * p.numel() for p in module.parameters() if p.requires_grad)  # float32 gradients


STAGE1_GRAD_BYTES = _stage_gradient_bytes(1, 3)
HOP_OVERHEAD = 2048  # bytes a hop's frames carry beyond the tensor: envelope, path, metadata, message prefixes


def _bytes_by_kind(n, direction: str) -> dict[str, float]:
    samples = scrape(n.started()["metrics_url"])
    return {kind: samples[f'swarm_node_{direction}_bytes_total{{kind="{kind}"}}'] for kind in KINDS}


# ---- a real Prometheus scrapes every node, and what it scrapes moves with the work --------------------------------
def _query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)["data"]["result"]
    except OSError:
        return []


def _value(port: int, expr: str) -> float | None:
    result = _query(port, expr)
    return float(result[0]["value"][1]) if result else None


# What a round's work moves, summed over the swarm's nodes as Prometheus scraped them.
MOVING = {"microbatches": 'sum(swarm_node_microbatches_forwarded_total{stage="1"})',
          "rounds": "sum(swarm_node_round_duration_seconds_count)",
          "tokens": "sum(swarm_node_tokens_total)",
          "activation bytes sent": 'sum(swarm_node_sent_bytes_total{kind="activations"})',
          "activation bytes received": 'sum(swarm_node_received_bytes_total{kind="activations"})',
          "sync bytes received": 'sum(swarm_node_received_bytes_total{kind="sync"})'}


def test_prometheus_scrapes_every_node_and_the_values_move_with_the_work(swarm, tmp_path):
    prometheus = shutil.which("prometheus")
    assert prometheus, "install prometheus (apt-get install prometheus); scripts/test.sh does it as root"
    nodes = [n for n in swarm.nodes if n.alive()]
    targets = [urllib.parse.urlparse(n.started()["metrics_url"]).netloc for n in nodes]
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: swarm-node\n"
                      f"    static_configs:\n      - targets: {json.dumps(targets)}\n")
    port = free_port()
    server = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _value(port, 'count(up{job="swarm-node"} == 1)') == len(nodes), 60,
                 "Prometheus to scrape every node")

        def moving() -> dict | None:
            values = {what: _value(port, expr) for what, expr in MOVING.items()}
            return values if all(v is not None and v > 0 for v in values.values()) else None
        first = wait_for(moving, 60, "a round's work in Prometheus")
        # Two more rounds later, every value has grown: they count work, they do not merely exist.
        wait_for(lambda: (_value(port, MOVING["rounds"]) or 0) >= first["rounds"] + 2 * len(nodes), 60,
                 "two more rounds")
        later = wait_for(lambda: (lambda v: v if v and all(v[w] > first[w] for w in v) else None)(moving()), 30,
                         "every value to grow")
        assert later["tokens"] - first["tokens"] >= 2 * 4 * 64, (first, later)  # 2 rounds of at least a sequence
        loss = _value(port, "swarm_node_loss")
        assert loss is not None and 0 < loss < 10
        for series in ("swarm_node_visible_peers", "swarm_node_dht_heartbeat_age_seconds"):
            assert _query(port, series), f"{series} was not scraped"
    finally:
        server.terminate()
        server.wait(10)


def test_forged_records_and_plans_are_ignored(swarm):
    """A public swarm: a peer in the DHT forges another node's record and publishes plans; nobody acts on them."""
    from dataclasses import replace

    from hivemind.dht import DHT
    from hivemind.utils import get_dht_time

    from node.control.discovery import read_members
    from protocol.record_auth import RefusalCounter, load_identity, owner_peer_id, record_validators
    from protocol.records import PlannedMicrobatch, RoundPlan, nodes_key, plan_key

    data = node(swarm, "data0")
    wait_for(lambda: rounds(data), 180, "a round on the data node")
    victim = data.started()["peer_id"]
    path, key, _ = load_identity(None)
    validators = record_validators(key, None, RefusalCounter())
    attacker = DHT(initial_peers=swarm.initial_peers(), start=True, identity_path=path,
                   record_validators=validators, check_if_identity_free=False)
    try:
        members = read_members(attacker, SWARM)
        victim_subkey = next(k for k, _ in attacker.get(nodes_key(SWARM), latest=True).value.items()
                             if owner_peer_id(k) == victim)
        hijacked = replace(members[victim], endpoint="10.255.255.1:9")
        expires = get_dht_time() + 60
        attacker.store(nodes_key(SWARM), hijacked.to_value(), expires, subkey=victim_subkey)  # not its to sign
        attacker.store(nodes_key(SWARM), replace(hijacked, stages=(1,)).to_value(), expires, subkey=b"0000")
        now = max(rounds(data))
        bogus = HopSpec(1, victim, "10.255.255.1:9")
        origin = HopSpec(0, victim, members[victim].endpoint)
        for r in range(now + 1, now + 6):
            plan = RoundPlan(r, victim, "forged", (PlannedMicrobatch(0, (origin, bogus, origin)),), expires)
            attacker.store(plan_key(SWARM, r), plan.to_value(), expires, subkey=b"0000")  # unsigned, lowest subkey
            attacker.store(plan_key(SWARM, r), plan.to_value(), expires, subkey=validators[0].local_public_key)
        wait_for(lambda: max(rounds(data)) >= now + 3, 120, "three rounds after the forgeries")
    finally:
        attacker.shutdown()
    listed = status(swarm)
    assert listed[victim]["endpoint"] == members[victim].endpoint and len(listed) == len(members)
    assert all(rounds(data)[r]["failed"] == 0 for r in range(now + 1, now + 4))
    text = "".join(metrics_text(n.started()["metrics_url"]) for n in swarm.nodes if n.alive())
    dropped = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
               if line.startswith(("swarm_node_records_dropped_total", "swarm_node_dht_records_refused_total"))}
    assert sum(v for k, v in dropped.items() if "not_planner" in k) > 0, dropped
    assert sum(v for k, v in dropped.items() if "unsigned" in k) > 0, dropped
    assert sum(v for k, v in dropped.items() if "refused" in k) > 0, dropped


def test_node_joining_mid_run_appears_then_serves(swarm):
    before = max(rounds(node(swarm, "data0")))
    # Its own records live 12 s (the others' 30 s), so the next test sees them expire sooner.
    joined = swarm.start_node("s2b", "2", initial_peers=swarm.initial_peers(), extra=["--record-ttl", "12"])
    swarm.wait_started([joined], timeout=120)
    peer = joined.started()["peer_id"]
    def serving_row():  # listed as `joining` while it copies its stage, then `serving`
        row = status(swarm).get(peer)
        return row if row and row["serving"] else None
    listed = wait_for(serving_row, 30, "the new node serving in `status`")
    assert listed["stages"] == "2" and listed["state"] == "serving"
    # It copied stage 2 from its replica, then trains in lock-step with it.
    wait_for(lambda: rounds(joined), 120, "the joined node to train a round")
    r = min(rounds(joined))
    assert r > before
    # The replica's weights after round r: it trained in it, or (left out by the plan) copied them from one that did.
    def replica_after(n, r):
        return {e["round"]: e for e in n.events() if e["event"] in ("round", "caught_up")}.get(r)
    other = wait_for(lambda: replica_after(node(swarm, "s2a"), r), 60, "the replica's state after the same round")
    assert rounds(joined)[r]["digests"]["2"] == other["digests"]["2"]


def test_killed_node_record_expires(swarm):
    victim = node(swarm, "s2b")
    peer = victim.started()["peer_id"]
    children = descendants(victim.process.pid)
    os.killpg(victim.process.pid, signal.SIGKILL)  # the host dies: no chance to withdraw
    victim.process.wait()
    killed_at = time.monotonic()
    assert peer in status(swarm)  # the record outlives its node for a while...
    # ...until it expires (12 s after the last heartbeat), and no p2pd of the dead node lingers.
    wait_for(lambda: peer not in status(swarm), 60, "the killed node's record to expire", interval=1)
    assert time.monotonic() - killed_at < 40
    wait_for(lambda: not [p for p in children if alive(p)], 10, "the killed node's children to exit")


def _stub(n):
    return StageStub(grpc.insecure_channel(n.started()["endpoint"]))


def _envelope(swarm, target, round_, hop=1, microbatch=0, swarm_id=SWARM):
    data = node(swarm, "data0").started()
    origin = HopSpec(0, data["peer_id"], data["endpoint"])
    me = HopSpec(1, target.started()["peer_id"], target.started()["endpoint"])
    return make_envelope(swarm_id, round_, microbatch, [origin, me, origin], hop)


def _send(stub, env, tensor, method="Forward", limits=WireLimits()):
    call = stub.Forward if method == "Forward" else stub.Backward
    with pytest.raises(grpc.RpcError) as e:
        call(encode_frames(env, tensor, limits), timeout=10)
    return e.value.code(), e.value.details()


def test_malformed_rpcs_get_a_reason_and_the_node_keeps_serving(swarm):
    target = node(swarm, "s1a")
    stub = _stub(target)
    good = torch.zeros(2, 8, HIDDEN)

    def now() -> int:
        """The round the node works on, read just before each call: rounds here take a fraction of a second."""
        return stub.Info(pb.InfoRequest(), timeout=5).round

    cases = [
        (lambda r: _envelope(swarm, target, r, swarm_id="intruders"), good, "Forward",
         grpc.StatusCode.PERMISSION_DENIED, "swarm id"),
        (lambda r: _envelope(swarm, target, r, hop=0), good, "Forward", grpc.StatusCode.INVALID_ARGUMENT, "hop 0"),
        (lambda r: _envelope(swarm, target, r + 1000), good, "Forward", grpc.StatusCode.FAILED_PRECONDITION,
         "unknown round"),
        (lambda r: _envelope(swarm, target, 0), good, "Forward", grpc.StatusCode.FAILED_PRECONDITION, "is over"),
        (lambda r: _envelope(swarm, target, r, microbatch=999), good, "Backward", grpc.StatusCode.NOT_FOUND,
         "not in round"),
        (lambda r: _envelope(swarm, target, r), torch.zeros(2, 8, HIDDEN + 1), "Forward",
         grpc.StatusCode.INVALID_ARGUMENT, "expected [batch, seq, 64]"),
        (lambda r: _envelope(swarm, target, r), good.to(torch.float16), "Forward",
         grpc.StatusCode.INVALID_ARGUMENT, "computes in float32"),
    ]
    for envelope, tensor, method, code, reason in cases:
        for _ in range(5):  # a round that ended under the call makes it a question about a past round: ask again
            round_ = now()
            got, details = _send(stub, envelope(round_), tensor, method)
            if now() == round_:
                break
        assert got == code and reason in details, (got, details)

    # A codec the node does not speak, and a header that lies about a codec's size: refused with a reason.
    generated = pb_grpc.StageServiceStub(grpc.insecure_channel(target.started()["endpoint"]))
    for meta, reason in [
        (pb.TensorMeta(dtype="float32", shape=[2, 8, HIDDEN], codec="zstd", nbytes=100),
         "unknown codec 'zstd'; this node speaks raw, bf16, int8, int4, lowrank"),
        (pb.TensorMeta(dtype="float32", shape=[2, 8, HIDDEN], codec="int4", nbytes=100, block_size=64),
         "does not match"),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            generated.Forward(iter([pb.TensorChunk(envelope=_envelope(swarm, target, now()), meta=meta)]), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in e.value.details()

    # No envelope at all (from a client generated from the .proto), then bytes that are not protobuf.
    with pytest.raises(grpc.RpcError) as e:
        generated.Forward(iter([pb.TensorChunk(data=b"xx")]), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "envelope" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Forward(iter([b"\xff\xff\xff"]), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in e.value.details()
    # One message over the node's message limit: refused by its own check, with the limit named; and one over
    # gRPC's cap (twice that): refused by gRPC itself.
    big = torch.zeros(1 << 20)  # 4 MiB in one chunk
    code, details = _send(stub, _envelope(swarm, target, now()), big, limits=WireLimits(chunk_bytes=16 << 20))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message limit" in details, details
    huge = torch.zeros(3 << 20)  # 12 MiB in one chunk
    code, _ = _send(stub, _envelope(swarm, target, now()), huge, limits=WireLimits(chunk_bytes=16 << 20))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A tensor announced larger than the node accepts: refused before its bytes are read.
    env = _envelope(swarm, target, now())
    meta = pb.TensorMeta(dtype="float32", shape=[1 << 16, 1 << 14], codec="raw", nbytes=4 << 30)
    with pytest.raises(grpc.RpcError) as e:
        generated.Forward(iter([pb.TensorChunk(envelope=env, meta=meta)]), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "exceeds the limit" in e.value.details()

    # Still serving: it answers, and the swarm keeps training with no microbatch lost.
    assert stub.Ping(pb.PingRequest(), timeout=5).peer_id == target.started()["peer_id"]
    data = node(swarm, "data0")
    last = max(rounds(data))
    wait_for(lambda: max(rounds(data)) >= last + 2, 120, "two more rounds after the bad input")
    assert all(rounds(data)[r]["failed"] == 0 for r in (last + 1, last + 2))


def test_sigterm_withdraws_and_leaves_nothing_running(swarm):
    leaving = node(swarm, "s1b")
    peer = leaving.started()["peer_id"]
    children = descendants(leaving.process.pid)
    assert len(children) >= 2  # at least the DHT process and its p2pd
    leaving.process.send_signal(signal.SIGTERM)
    assert leaving.process.wait(timeout=20) == 0
    # Its DHT process and p2pd exit with it (there is no torch_shm_manager: node/process/children.py).
    wait_for(lambda: not [p for p in children if alive(p)], 10, "the node's child processes to exit")
    # Withdrawn at once, long before its 30 s record would have expired.
    wait_for(lambda: peer not in status(swarm), 15, "the withdrawn record to disappear")

    # Then the whole swarm.
    pids = [n.process.pid for n in swarm.nodes if n.alive()]
    everything = set(pids).union(*(descendants(p) for p in pids))
    for n in swarm.nodes:
        if n.alive():
            n.process.send_signal(signal.SIGTERM)
    for n in swarm.nodes:
        assert n.process.wait(timeout=20) in (0, -9)  # -9 only for the node killed above
    wait_for(lambda: not [p for p in everything if alive(p)], 10, "every child process to exit")
