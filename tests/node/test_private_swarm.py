"""A private swarm on loopback: members hold the swarm key; a stranger with the wrong key joins through a
member's multiaddr and gets nowhere, replays and stale calls are refused, and training goes on throughout.
"""

from __future__ import annotations

import json
import os
import stat
import time

import grpc
import pytest
import torch

from node.process.local_swarm import LocalSwarm
from protocol.envelope import HopSpec, make_envelope
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.limits import WireLimits
from protocol.rpc_auth import UNBOUND, ClientAuthInterceptor, SwarmAuth
from protocol.service import SERVICE, StageStub
from protocol.swarm_key import load_key_file
from protocol.tensor_frames import encode_frames
from tests.helpers import free_port, metric, node, rounds, run_cli, sample, scrape, wait_for

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
    member = swarm.start_node("s1", "1", initial_peers=peers,
                              extra=["--swarm-key", str(key), "--stream-idle-timeout", "3"])
    stranger = swarm.start_node("stranger", "1", initial_peers=peers, extra=["--swarm-key", str(wrong)])
    swarm.wait_started([member, stranger], timeout=180)
    yield swarm
    swarm.stop()


def status(swarm, key) -> dict[str, dict]:
    extra = ["--swarm-key", str(key)] if key else []
    result = run_cli("status", "--swarm", SWARM, "--json", "--initial-peers", *swarm.initial_peers(), *extra)
    assert result.returncode == 0, result.stderr
    return {row["peer"]: row for row in json.loads(result.stdout)["nodes"]}


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


def _channel(n, auth=None, receiver=None):
    """A channel to node `n`; with `auth`, its tags bound to `receiver` (by default `n`'s own peer id)."""
    channel = grpc.insecure_channel(n.started()["endpoint"])
    receiver = n.started()["peer_id"] if receiver is None else receiver
    return grpc.intercept_channel(channel, ClientAuthInterceptor(auth, receiver)) if auth else channel


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
    # (training goes on through all of it: checked after the hostile client below)


# ---- hostile input: a client holding the key probes a stage node; each try is refused cheaply -------------------
def _signed(auth, env, tensor, method="Forward"):
    return list(encode_frames(env, tensor, WireLimits(), lambda e, m, d: auth.sign_frames(method, e, m, d)))


def _header_only(auth, env, meta):
    env = pb.Envelope.FromString(env.SerializeToString())
    env.auth = auth.sign_frames("Forward", env, meta, b"")
    return pb.TensorChunk(envelope=env, meta=meta).SerializeToString()


def _hostile_case(swarm, auth, case: str, round_offset: int, microbatch: int):
    """(frames, expected code(s), a word the reason must contain) for one hostile try."""
    target = node(swarm, "s1")
    current = max(rounds(target), default=-1) + 1
    tensor = torch.zeros(4, 64, HIDDEN)
    env = _forward(swarm, target, current + round_offset, microbatch)
    if case == "not_in_plan":  # fills no slot: the plan has no such microbatch
        # (the round moves on meanwhile: a round the node is not at is refused for that, also before any slot)
        return _signed(auth, env, tensor), {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                            grpc.StatusCode.FAILED_PRECONDITION}, "round"
    if case == "replay":
        frames = _signed(auth, env, tensor)
        try:
            StageStub(_channel(target)).Forward(iter(frames), timeout=10)
        except grpc.RpcError:
            pass
        return frames, {grpc.StatusCode.UNAUTHENTICATED}, "replayed"
    if case == "too_large":  # announced far above this swarm's activation size: refused from the header
        meta = pb.TensorMeta(dtype="float32", shape=[600, 2048, HIDDEN], codec="raw", nbytes=600 * 2048 * HIDDEN * 4)
        return [_header_only(auth, env, meta)], {grpc.StatusCode.RESOURCE_EXHAUSTED}, "exceeds the limit"
    if case == "overflow":  # 2^62 x 4 x 64 floats: no integer overflow, a clear refusal for its size
        meta = pb.TensorMeta(dtype="float32", shape=[1 << 62, 4, 64], codec="raw", nbytes=1 << 62)
        return [_header_only(auth, env, meta)], {grpc.StatusCode.RESOURCE_EXHAUSTED}, "exceeds the limit"
    if case == "tiny_chunks":  # the right bytes, one byte per chunk
        frames = _signed(auth, env, torch.zeros(1, 1, HIDDEN))
        head, data = frames[0][:-(HIDDEN * 4 + 3)], frames[0][-(HIDDEN * 4):]
        ones = [head] + [b"\x1a\x01" + data[i:i + 1] for i in range(len(data))]
        return ones, {grpc.StatusCode.INVALID_ARGUMENT}, "chunks"
    if case == "empty_chunks":
        frames = _signed(auth, env, torch.zeros(1, 1, HIDDEN))
        return frames[:1] + [b""] * 50, {grpc.StatusCode.INVALID_ARGUMENT}, "empty chunk"
    raise AssertionError(case)


CASES = ["not_in_plan", "replay", "too_large", "overflow", "tiny_chunks", "empty_chunks"]


def _foreign_hop(swarm, auth, stub) -> tuple | None:
    """A planned microbatch of the live round whose path returns through an address of the client's choice.
    None while the target is not judging that round's path: it lacks the plan (RESOURCE_EXHAUSTED, retry
    shortly) or the round ended meanwhile (FAILED_PRECONDITION)."""
    target, data = node(swarm, "s1"), node(swarm, "data0").started()
    live = StageStub(_channel(target, auth)).Info(pb.InfoRequest(), timeout=5).round
    origin = _forward(swarm, target, live).path[0]
    path = [HopSpec(0, origin.peer_id, origin.endpoint),
            HopSpec(1, target.started()["peer_id"], target.started()["endpoint"]),
            HopSpec(0, data["peer_id"], "10.255.255.1:9")]
    env = make_envelope(SWARM, live, 0, path, 1)
    code, details = _code(stub.Forward, iter(_signed(auth, env, torch.zeros(4, 64, HIDDEN))))
    waiting = (code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry shortly" in details
               or code == grpc.StatusCode.FAILED_PRECONDITION)
    return None if waiting else (code, details)


# The silent streams hold the target's per-address stream slots, which on loopback the honest data node
# shares: its forward waits (RESOURCE_EXHAUSTED is retried) until the guard cancels them. The origin
# waits for such a slow hop when no other path exists rather than giving its microbatch up.
def test_hostile_input_is_refused_while_rounds_go_on(swarm):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    auth = SwarmAuth(load_key_file(swarm.key))
    target, data = node(swarm, "s1"), node(swarm, "data0")
    stub = StageStub(_channel(target))
    before = [e["wall_s"] for e in rounds(data).values()]
    first = max(rounds(data)) + 1

    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=st.sampled_from(CASES), round_offset=st.integers(0, 1), microbatch=st.integers(2, 10 ** 6))
    def probe(case, round_offset, microbatch):
        frames, codes, word = _hostile_case(swarm, auth, case, round_offset, microbatch)
        code, details = _code(stub.Forward, iter(frames))
        assert code in codes and word in details, (case, code, details)

    probe()
    code, details = wait_for(lambda: _foreign_hop(swarm, auth, stub), 30, "the live round's path judged")
    assert code == grpc.StatusCode.PERMISSION_DENIED and "10.255.255.1:9 " in details, details
    # Silent streams: a valid header, then nothing. They cannot take every worker, and are cancelled.
    import threading

    env = _forward(swarm, target, 10_000)
    meta = pb.TensorMeta(dtype="float32", shape=[4, 64, HIDDEN], codec="raw", nbytes=4 * 64 * HIDDEN * 4)
    hold = threading.Event()
    results = []

    def silent():
        def frames():
            yield _header_only(auth, env, meta)
            hold.wait(60)
        results.append(_code(stub.Forward, frames()))

    threads = [threading.Thread(target=silent) for _ in range(20)]
    for t in threads:
        t.start()
    time.sleep(1)
    pinged = time.monotonic()
    assert StageStub(_channel(target, auth)).Ping(pb.PingRequest(), timeout=5).peer_id
    assert time.monotonic() - pinged < 2
    for t in threads:
        t.join(30)
    hold.set()
    codes = {code for code, _ in results}
    assert len(results) == 20 and codes <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED}, results
    assert grpc.StatusCode.CANCELLED in codes
    assert metric(target, 'swarm_node_streams_refused_total{reason="idle"}') > 0
    # Rounds went on at their usual pace, losing nothing.
    wait_for(lambda: max(rounds(data)) >= first + 2, 120, "two more rounds")
    during = [rounds(data)[r]["wall_s"] for r in range(first, max(rounds(data)) + 1)]
    assert all(rounds(data)[r]["failed"] == 0 for r in range(first, max(rounds(data)) + 1))
    assert sorted(during)[len(during) // 2] < 2 * sorted(before)[len(before) // 2] + 2, (before, during)


# ---- control messages: only from the sender the round's signed plan allows ---------------------------------------
def _denied(n, method: str) -> float:
    return scrape(n.started()["metrics_url"]).get(
        f'swarm_node_rpc_errors_total{{code="PERMISSION_DENIED",method="{method}"}}', 0.0)


def _judged(answer: tuple) -> tuple | None:
    code, details = answer
    return None if code == grpc.StatusCode.FAILED_PRECONDITION and "no signed plan" in details else answer


def test_forged_control_messages_are_denied_and_the_round_loses_nothing(swarm):
    """A member (it holds the swarm key, so every call passes the key's check) that is not the microbatch's
    origin, nor on its path, tries to drop a node's held activations (Reroute with a higher attempt), to end a
    node's round early (RoundDone for the origin) and to make the origin avoid a healthy peer (ReportFailure)."""
    from hivemind.utils.crypto import RSAPrivateKey

    from protocol.notice_auth import NoticeSigner

    data, target = node(swarm, "data0"), node(swarm, "s1")
    data_id, target_id = data.started()["peer_id"], target.started()["peer_id"]
    auth = SwarmAuth(load_key_file(swarm.key))
    member = NoticeSigner(RSAPrivateKey())  # its own identity: not the origin's
    to_target, to_data = StageStub(_channel(target, auth)), StageStub(_channel(data, auth))
    wait_for(lambda: len(rounds(data)) >= 2, 180, "two rounds")
    before = {"Reroute": _denied(target, "Reroute"), "RoundDone": _denied(target, "RoundDone"),
              "ReportFailure": _denied(data, "ReportFailure")}

    def live_round() -> int:
        return to_data.Info(pb.InfoRequest(), timeout=5).round

    forged = [
        (to_target.Reroute, "Reroute", lambda r: pb.RerouteNotice(swarm_id=SWARM, round=r, microbatch=0, attempt=7),
         target_id, "only its origin"),
        (to_target.RoundDone, "RoundDone", lambda r: pb.RoundDoneNotice(swarm_id=SWARM, round=r, origin=data_id),
         target_id, "an origin says only for itself that it is done"),
        (to_data.ReportFailure, "ReportFailure",
         # the round before the live one: the origin has fed all of its microbatches, and still knows their paths
         lambda r: pb.FailureReport(swarm_id=SWARM, round=r - 1, microbatch=0, attempt=0, failed_peer=target_id,
                                    reason="forged"), data_id, "only its nodes report its failures"),
    ]
    first = live_round()
    for call, method, message, receiver, reason in forged:
        code, details = _code(call, message(live_round()))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "carries no sender proof" in details, details
        code, details = _code(call, member.sign(method, message(live_round()), "someone-else"))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "does not verify" in details, details
        # The receiver may not have fetched the live round's plan yet (it answers FAILED_PRECONDITION, no plan):
        # ask again until it judges the sender against the plan.
        code, details = wait_for(lambda: _judged(_code(call, member.sign(method, message(live_round()), receiver))),
                                 30, f"{method} judged against a signed plan")
        assert code == grpc.StatusCode.PERMISSION_DENIED and reason in details, (method, details)
    counted = {"Reroute": _denied(target, "Reroute"), "RoundDone": _denied(target, "RoundDone"),
               "ReportFailure": _denied(data, "ReportFailure")}
    assert all(counted[m] >= before[m] + 3 for m in counted), (before, counted)
    # Nothing changed: the rounds the forgeries aimed at, and the next ones, finish every microbatch
    # on their planned paths.
    wait_for(lambda: max(rounds(data)) >= first + 2, 120, "two more rounds")
    aimed = [rounds(data)[r] for r in range(first, max(rounds(data)) + 1) if r in rounds(data)]
    assert aimed and all(e["failed"] == 0 and e["reroutes"] == 0 for e in aimed), aimed


# ---- reachability: a joining node asks a member to dial it back --------------------------------------------------
def test_reachability_self_check(swarm):
    from node.host.reachability import self_check
    from node.dataplane.transport import StageClients
    from protocol.records import NodeRecord, NodeState

    member, stranger = node(swarm, "s1"), node(swarm, "stranger")
    checked = wait_for(lambda: member.events("reachability"), 30, "the member's reachability check")
    assert checked[0]["ok"] and checked[0]["reach"] == "direct", checked
    refused = wait_for(lambda: stranger.events("reachability"), 30, "the stranger's reachability check")
    assert not refused[0]["ok"] and "--swarm-key" in refused[0]["message"]

    auth = SwarmAuth(load_key_file(swarm.key))
    started = member.started()
    record = NodeRecord(peer_id=started["peer_id"], endpoint=started["endpoint"], stages=(1,), compute_s={1: 0.1},
                        memory_slots=8, role="stage", version="x", swarm=SWARM, round=0, state=NodeState.SERVING)
    clients = StageClients(WireLimits(), auth)
    try:
        closed = f"127.0.0.1:{free_port()}"
        result = self_check({record.peer_id: record}, "me", closed, [], clients, timeout=10)
        assert not result.ok and result.reach.value == "unreachable", result
        assert f"not reachable at {closed}" in result.message and f"forward TCP port {closed.split(':')[1]}" \
            in result.message, result.message
        # A member dials back only the address the call came from, whatever host the request names.
        reply = clients.stub(started["endpoint"], receiver=started["peer_id"]).CheckReachability(
            pb.ReachabilityRequest(endpoint="10.255.255.1:9"), timeout=10)
        assert reply.observed_host == "127.0.0.1" and not reply.grpc_reachable and "127.0.0.1:9" in reply.detail
    finally:
        clients.close()


# ---- tags name their receiver; every RPC needs the key ---------------------------------------------------------
def _refused(n, method: str, reason: str) -> float:
    return sample(n, f'swarm_node_auth_refused_total{{method="{method}",reason="{reason}"}}') or 0.0


class _Recorder(grpc.UnaryStreamClientInterceptor):
    """Keeps the metadata of each call as it leaves the client: what a sniffer sees without TLS."""

    def __init__(self):
        self.metadata = []

    def intercept_unary_stream(self, continuation, details, request):
        self.metadata.append(list(details.metadata))
        return continuation(details, request)


def test_a_tag_made_for_one_member_is_refused_by_another(swarm):
    data, target = node(swarm, "data0"), node(swarm, "s1")
    data_id, target_id = data.started()["peer_id"], target.started()["peer_id"]
    auth = SwarmAuth(load_key_file(swarm.key))
    before = _refused(target, "FetchState", "other_receiver")
    # A member fetches stage 0's weights from data0; a sniffer keeps the call's metadata.
    recorder = _Recorder()
    channel = grpc.intercept_channel(grpc.insecure_channel(data.started()["endpoint"]),
                                     ClientAuthInterceptor(auth, data_id), recorder)
    request = pb.StateRequest(swarm_id=SWARM, stage=0)
    assert list(StageStub(channel).FetchState(request, timeout=30))  # the weights came back to the member
    (captured,) = recorder.metadata
    # Replayed at once to s1: refused for naming another receiver (not as a replay: s1 never saw the nonce).
    replay = grpc.insecure_channel(target.started()["endpoint"]).unary_stream(
        f"/{SERVICE}/FetchState", request_serializer=pb.StateRequest.SerializeToString)
    code, details = _code(lambda r, timeout: replay(r, timeout=timeout, metadata=captured), request)
    assert code == grpc.StatusCode.UNAUTHENTICATED, (code, details)
    assert f"made for receiver ...{data_id[-8:]}, not this node ...{target_id[-8:]}" in details, details
    # A tag for data0 over a request that s1 would answer with its stage 1 weights: refused by s1 ...
    for_data = StageStub(_channel(target, auth, receiver=data_id))
    code, details = _code(for_data.FetchState, pb.StateRequest(swarm_id=SWARM, stage=1))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "made for receiver" in details, details
    # ... and by the control and read calls alike, Ping and Info included: a bound tag is good only at its receiver.
    for call, message in [(for_data.FetchGradients, pb.GradientRequest(swarm_id=SWARM, stage=1, round=0)),
                          (for_data.Ping, pb.PingRequest()), (for_data.Info, pb.InfoRequest())]:
        code, details = _code(call, message)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "made for receiver" in details, (call, details)
    # A Forward tagged for data0 (its envelope's hop): refused by s1 from the header.
    code, details = _code(StageStub(_channel(target)).Forward,
                          iter(_signed(auth, _forward(swarm, data, 10_000), torch.zeros(2, 8, HIDDEN))))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "made for receiver" in details, details
    assert _refused(target, "Forward", "other_receiver") >= 1
    # A tag naming no receiver is good only for Ping and Info.
    unbound = StageStub(_channel(target, auth, receiver=UNBOUND))
    assert unbound.Ping(pb.PingRequest(), timeout=5).peer_id == target_id
    code, details = _code(unbound.FetchState, pb.StateRequest(swarm_id=SWARM, stage=1))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "names no receiver" in details, details
    # Counted, and s1 keeps serving: bound to it, the same request returns its weights.
    assert _refused(target, "FetchState", "other_receiver") == before + 2
    assert _refused(target, "FetchState", "unbound") >= 1
    state = list(StageStub(_channel(target, auth)).FetchState(pb.StateRequest(swarm_id=SWARM, stage=1), timeout=30))
    assert state and sum(len(c.data) for c in state) > 0


def _every_method(*files):
    """(full method name, descriptor) of every RPC of every service in these generated proto modules."""
    return [(f"/{service.full_name}/{m.name}", m) for f in files for service in f.DESCRIPTOR.services_by_name.values()
            for m in service.methods]


def _call_without_key(channel: grpc.Channel, path: str, method, frames: list[bytes]):
    """(code, details) of calling `path` with no tag: its default request, or a real unsigned tensor's frames."""
    from google.protobuf.message_factory import GetMessageClass

    request = GetMessageClass(method.input_type)().SerializeToString()
    make = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    call = make[method.client_streaming, method.server_streaming](path)  # raw bytes both ways
    if not method.client_streaming:
        return _code(call, request)
    return _code(call, iter(frames if method.input_type.full_name == "swarm.v1.TensorChunk" else [request]))


def test_every_stage_rpc_without_the_key_is_unauthenticated(swarm):
    from protocol.generated.swarm.v1 import stage_pb2

    target = node(swarm, "s1")
    methods = _every_method(stage_pb2)  # from the descriptors: an RPC added later is covered too
    names = {path.rsplit("/", 1)[1] for path, _ in methods}
    assert {"Forward", "Backward", "Ping", "Info", "FetchState", "FetchGradients", "ReportFailure", "Reroute",
            "RoundDone", "CheckReachability"} <= names, names
    before = {name: _refused(target, name, "missing") for name in names}
    frames = list(encode_frames(_forward(swarm, target, 10_000), torch.zeros(2, 8, HIDDEN), WireLimits()))
    channel = grpc.insecure_channel(target.started()["endpoint"])
    for path, method in methods:
        code, details = _call_without_key(channel, path, method, frames)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "no auth tag" in details, (path, code, details)
    assert all(_refused(target, name, "missing") == before[name] + 1 for name in names)
    auth = SwarmAuth(load_key_file(swarm.key))
    assert StageStub(_channel(target, auth)).Info(pb.InfoRequest(), timeout=5).stages == [1]  # still serving


def test_every_expert_rpc_without_the_key_is_unauthenticated(swarm, tmp_path):
    """No node of this swarm runs the expert role (it trains experts: minutes on these cores). ExpertService
    sits behind the same interceptors as StageService on a node's one server, so here a server wired as
    node/host/host.py wires it (RpcGuard, then NodeTrust.server_interceptors) serves the real ExpertServicer."""
    from concurrent.futures import ThreadPoolExecutor

    from node.expert.service import ExpertServicer, ServedExperts
    from node.host.metrics import NodeMetrics
    from node.host.rpc_guard import RpcGuard
    from node.host.trust import NodeTrust
    from protocol.generated.swarm.v1 import experts_pb2, experts_pb2_grpc

    trust, metrics = NodeTrust.create("", str(swarm.key)), NodeMetrics()
    server = grpc.server(ThreadPoolExecutor(4), interceptors=[RpcGuard(metrics),
                                                              *trust.server_interceptors(metrics, "expert-node")])
    experts_pb2_grpc.add_ExpertServiceServicer_to_server(
        ExpertServicer(SWARM, ServedExperts(), on_data_loss=lambda r: None, on_bytes=lambda n: None), server)
    endpoint = f"127.0.0.1:{trust.add_port(server, '127.0.0.1', 0)}"
    server.start()
    try:
        methods = _every_method(experts_pb2)
        assert "/swarm.v1.ExpertService/FetchExpert" in {path for path, _ in methods}
        channel = grpc.insecure_channel(endpoint)
        for path, method in methods:
            code, details = _call_without_key(channel, path, method, [])
            assert code == grpc.StatusCode.UNAUTHENTICATED and "no auth tag" in details, (path, code, details)
            refused = metrics.registry.get_sample_value("swarm_node_auth_refused_total",
                                                     {"method": path.rsplit("/", 1)[1], "reason": "missing"})
            assert refused == 1, path
        # With the key, bound to this node, the call passes and the servicer answers; bound to another, refused.
        auth = SwarmAuth(load_key_file(swarm.key))
        request = experts_pb2.ExpertRequest(swarm_id=SWARM, expert_id="none")
        for receiver, expected in (("expert-node", grpc.StatusCode.NOT_FOUND),
                                   ("another-node", grpc.StatusCode.UNAUTHENTICATED)):
            stub = experts_pb2_grpc.ExpertServiceStub(
                grpc.intercept_channel(channel, ClientAuthInterceptor(auth, receiver)))
            code, details = _code(stub.FetchExpert, request)
            assert code == expected, (receiver, code, details)
    finally:
        server.stop(None)
        trust.close()
