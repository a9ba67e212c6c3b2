"""A private swarm on loopback: members hold the swarm key; a stranger with the wrong key joins through a
member's multiaddr and gets nowhere, replays and stale calls are refused, and training goes on throughout.
"""

from __future__ import annotations

import json
import os
import stat
import time
import urllib.request

import grpc
import pytest
import torch

from node.local_swarm import LocalSwarm
from protocol.envelope import HopSpec, make_envelope
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.limits import WireLimits
from protocol.rpc_auth import ClientAuthInterceptor, SwarmAuth
from protocol.service import StageStub
from protocol.swarm_key import load_key_file
from protocol.tensor_codec import encode_frames
from tests.helpers import run_cli, wait_for

pytestmark = pytest.mark.slow

SWARM = "private-swarm"
HIDDEN = 64  # the tiny preset
COMMON = ["--num-stages", "2", "--torch-threads", "1", "--device", "cpu", "--microbatches", "2",
          "--round-timeout", "20", "--heartbeat-interval", "1", "--record-ttl", "30", "--log-level", "info"]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("private")
    key, wrong = workdir / "swarm.key", workdir / "wrong.key"
    for path in (key, wrong):
        result = run_cli("keygen", str(path))
        assert result.returncode == 0, result.stderr
    swarm = LocalSwarm(workdir, SWARM, common_args=COMMON)
    swarm.key, swarm.wrong_key = key, wrong
    first = swarm.start_node("data0", "0", extra=["--swarm-key", str(key)])
    swarm.wait_started([first], timeout=120)
    peers = swarm.initial_peers()
    member = swarm.start_node("s1", "1", initial_peers=peers, extra=["--swarm-key", str(key)])
    stranger = swarm.start_node("stranger", "1", initial_peers=peers, extra=["--swarm-key", str(wrong)])
    swarm.wait_started([member, stranger], timeout=180)
    yield swarm
    swarm.stop()


def node(swarm, name):
    return next(n for n in swarm.nodes if n.name == name)


def rounds(n) -> dict[int, dict]:
    return {e["round"]: e for e in n.events("round")}


def status(swarm, key) -> dict[str, dict]:
    extra = ["--swarm-key", str(key)] if key else []
    result = run_cli("status", "--swarm", SWARM, "--json", "--initial-peers", *swarm.initial_peers(), *extra)
    assert result.returncode == 0, result.stderr
    return {row["peer"]: row for row in json.loads(result.stdout)["nodes"]}


def metric(n, name: str) -> float:
    text = urllib.request.urlopen(n.started()["metrics_url"], timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_keygen_writes_a_private_256_bit_key(swarm):
    assert len(load_key_file(swarm.key)) == 32
    assert stat.S_IMODE(os.stat(swarm.key).st_mode) == 0o600
    again = run_cli("keygen", str(swarm.key))
    assert again.returncode == 2 and "exists" in again.stderr


def test_members_train_and_the_stranger_is_invisible(swarm):
    data, member, stranger = node(swarm, "data0"), node(swarm, "s1"), node(swarm, "stranger")
    wait_for(lambda: len(rounds(data)) >= 3, 180, "3 rounds on the data node")
    seen = status(swarm, swarm.key)
    assert set(seen) == {data.started()["peer_id"], member.started()["peer_id"]}
    assert stranger.alive() and not rounds(stranger)  # it never got a plan it could act on
    # Members refused its records (the MAC does not verify), and counted them.
    assert metric(data, "swarm_node_dht_records_refused") + metric(member, "swarm_node_dht_records_refused") > 0
    assert all(rounds(data)[r]["failed"] == 0 for r in rounds(data))


def _channel(n, auth=None):
    channel = grpc.insecure_channel(n.started()["endpoint"])
    return grpc.intercept_channel(channel, ClientAuthInterceptor(auth)) if auth else channel


def _forward(swarm, target, round_, microbatch=0):
    data = node(swarm, "data0").started()
    origin = HopSpec(0, data["peer_id"], data["endpoint"])
    me = HopSpec(1, target.started()["peer_id"], target.started()["endpoint"])
    return make_envelope(SWARM, round_, microbatch, [origin, me, origin], 1)


def _code(call, *args):
    with pytest.raises(grpc.RpcError) as e:
        result = call(*args, timeout=10)
        if hasattr(result, "__next__"):
            list(result)
    return e.value.code(), e.value.details()


def test_calls_without_the_key_are_unauthenticated(swarm):
    target = node(swarm, "s1")
    before = metric(target, "swarm_node_auth_refused")
    wrong = SwarmAuth(load_key_file(swarm.wrong_key))
    env, tensor = _forward(swarm, target, 10_000), torch.zeros(2, 8, HIDDEN)
    for auth in (None, wrong):
        stub = StageStub(_channel(target, auth))
        sign = (lambda e, m, d: wrong.sign_frames("Forward", e, m, d)) if auth else None
        calls = [(stub.Ping, pb.PingRequest()), (stub.Info, pb.InfoRequest()),
                 (stub.FetchState, pb.StateRequest(swarm_id=SWARM, stage=1)),
                 (stub.Forward, encode_frames(env, tensor, WireLimits(), sign)),
                 (stub.Backward, encode_frames(env, tensor, WireLimits(), sign))]
        for call, request in calls:
            code, details = _code(call, request)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (call, code, details)
            assert ("no auth tag" if auth is None else "does not verify") in details
    assert metric(target, "swarm_node_auth_refused") >= before + 10


def test_replayed_and_stale_calls_are_refused(swarm):
    target = node(swarm, "s1")
    auth = SwarmAuth(load_key_file(swarm.key))
    stub = StageStub(_channel(target))
    env, tensor = _forward(swarm, target, 10_000), torch.zeros(2, 8, HIDDEN)
    frames = list(encode_frames(env, tensor, WireLimits(), lambda e, m, d: auth.sign_frames("Forward", e, m, d)))
    code, details = _code(stub.Forward, iter(frames))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details  # authenticated; refused for its round
    code, details = _code(stub.Forward, iter(frames))  # the same tag again
    assert code == grpc.StatusCode.UNAUTHENTICATED and "replayed" in details
    # Tensor bytes changed in flight under a fresh tag.
    frames = list(encode_frames(env, tensor, WireLimits(), lambda e, m, d: auth.sign_frames("Forward", e, m, d)))
    tampered = frames[:-1] + [frames[-1][:-1] + bytes([frames[-1][-1] ^ 1])]
    code, details = _code(stub.Forward, iter(tampered))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "tensor bytes" in details
    # A tag made two minutes ago.
    old = SwarmAuth(load_key_file(swarm.key), clock=lambda: time.time() - 120)
    code, details = _code(StageStub(_channel(target, old)).Ping, pb.PingRequest())
    assert code == grpc.StatusCode.UNAUTHENTICATED and "stale" in details
    # With the key, calls work.
    good = StageStub(_channel(target, auth))
    assert good.Ping(pb.PingRequest(), timeout=5).peer_id == target.started()["peer_id"]
    # Training went on through all of it.
    data = node(swarm, "data0")
    last = max(rounds(data))
    wait_for(lambda: max(rounds(data)) >= last + 2, 120, "two more rounds")
    assert all(rounds(data)[r]["failed"] == 0 for r in rounds(data))
