"""A relay carries a member's connections without reading them, within its limits, and lets go when either
side goes (node/relay/). In one process: a gRPC server hosting the relay service (with the host's guard and
metrics), the member's RelayTunnel, and plain sockets or gRPC clients as the peers."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from node.config import RelayConfig
from node.dataplane.transport import StageClients
from node.host.metrics import NodeMetrics
from node.host.rpc_guard import RpcGuard
from node.relay.server import PREAMBLE, NotARelay, RelayServer
from node.relay.tunnel import RelayTunnel
from protocol.generated.swarm.v1 import relay_pb2 as pb
from protocol.limits import WireLimits
from protocol.records import NodeRecord, NodeState, Reach
from protocol.service import RelayStub, relay_service_handler
from tests.helpers import free_port, wait_for

SWARM = "relay-test"


def relay_record(endpoint: str, peer: str = "QmRelay") -> NodeRecord:
    return NodeRecord(peer_id=peer, endpoint=endpoint, stages=(1,), compute_s={}, memory_slots=1, role="stage",
                      version="0", swarm=SWARM, round=0, state=NodeState.SERVING, reach=Reach.DIRECT)


class Relay:
    """A relay member's gRPC server with only the relay service (as the host registers it)."""

    def __init__(self, config: RelayConfig, relays: bool = True):
        self.metrics = NodeMetrics()
        self.relay = RelayServer.create(config, "127.0.0.1", "127.0.0.1", SWARM, self.metrics, 0.05) if relays \
            else None
        self.server = grpc.server(ThreadPoolExecutor(8), interceptors=[RpcGuard(self.metrics)])
        self.server.add_generic_rpc_handlers((relay_service_handler(self.relay or NotARelay(self.metrics)),))
        self.endpoint = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def value(self, name: str, **labels) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def stop(self) -> None:
        self.server.stop(0).wait()
        if self.relay is not None:
            self.relay.close()


def health_server() -> tuple[grpc.Server, str]:
    """The member's own gRPC server (a health service stands in for the stage service)."""
    server = grpc.server(ThreadPoolExecutor(4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def echo_server() -> tuple[socket.socket, str]:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=conn: [c.sendall(d) for d in iter(lambda: c.recv(65536), b"")],
                             daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    return listener, f"127.0.0.1:{listener.getsockname()[1]}"


class Member:
    """The member behind NAT: a RelayTunnel to the given relays, its attachments recorded."""

    def __init__(self, relays: dict[str, str], target: str, config: RelayConfig, me: str = "QmMember"):
        self.attached: list[tuple[str, str]] = []
        self.detached: list[str] = []
        self.stop = threading.Event()
        self.clients = StageClients(WireLimits())
        records = {peer: relay_record(endpoint, peer) for peer, endpoint in relays.items()}
        self.members = lambda: records
        self.tunnel = RelayTunnel.create(me, SWARM, lambda: self.members(), self.clients, target, config,
                                         self.stop, on_attached=lambda e, r: self.attached.append((e, r)),
                                         on_detached=self.detached.append)

    def close(self) -> None:
        self.tunnel.close()
        self.clients.close()


@pytest.fixture
def config() -> RelayConfig:
    return RelayConfig(port=free_port(), tunnel_timeout=5.0)


def test_peers_reach_a_member_through_its_relay_and_the_relay_counts_the_bytes(config):
    relay = Relay(config)
    server, target = health_server()
    member = Member({"QmRelay": relay.endpoint}, target, config)
    try:
        endpoint, via = wait_for(lambda: member.attached, 10, "the member to attach")[0]
        assert via == "QmRelay" and endpoint == f"127.0.0.1:{config.port + 1}"  # the first port after --relay-port
        assert relay.value("swarm_node_relay_attached") == 1
        with grpc.insecure_channel(endpoint) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert relay.value("swarm_node_relayed_bytes_total") > 0
        # The relay stops: the member is told, and peers no longer reach it there.
        relay.stop()
        assert wait_for(lambda: member.detached, 10, "the member to notice")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", config.port + 1), timeout=1).close()
    finally:
        member.close()
        relay.stop()
        server.stop(0)


def test_the_relay_limit_caps_relayed_bytes_per_second(config):
    relay = Relay(replace(config, limit=4.0))  # MiB/s, both ways together
    listener, target = echo_server()
    member = Member({"QmRelay": relay.endpoint}, target, config)
    try:
        endpoint, _ = wait_for(lambda: member.attached, 10, "the member to attach")[0]
        host, port = endpoint.split(":")
        payload = b"x" * (3 * 1024 * 1024)
        with socket.create_connection((host, int(port)), timeout=10) as peer:
            started = time.monotonic()
            threading.Thread(target=peer.sendall, args=(payload,), daemon=True).start()
            got = 0
            while got < len(payload):
                got += len(peer.recv(1 << 20))
            elapsed = time.monotonic() - started
        assert elapsed > 1.0, elapsed  # 6 MiB crossed at 4 MiB/s: 1.5 s less the burst
        # counted once each piece is passed on: the last count may land just after the peer read it
        wait_for(lambda: relay.value("swarm_node_relayed_bytes_total") >= 2 * len(payload), 5, "the byte count")
    finally:
        member.close()
        relay.stop()
        listener.close()


def test_refusals_have_a_status_and_a_reason_and_the_relay_keeps_serving(config):
    relay = Relay(replace(config, nodes=1))
    not_relay = Relay(config, relays=False)
    server, target = health_server()
    member = Member({"QmRelay": relay.endpoint}, target, config)
    try:
        wait_for(lambda: member.attached, 10, "the member to attach")
        with grpc.insecure_channel(relay.endpoint) as channel:
            stub = RelayStub(channel)
            with pytest.raises(grpc.RpcError) as full:
                next(stub.Attach(pb.AttachRequest(swarm_id=SWARM, peer_id="QmOther"), timeout=5))
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--relay-nodes" in full.value.details()
            with pytest.raises(grpc.RpcError) as other:
                next(stub.Attach(pb.AttachRequest(swarm_id="another", peer_id="QmOther"), timeout=5))
            assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with grpc.insecure_channel(not_relay.endpoint) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                next(RelayStub(channel).Attach(pb.AttachRequest(swarm_id=SWARM), timeout=5))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "--relay-limit 0" in refused.value.details()
        assert not_relay.value("swarm_node_relay_refused_total", reason="not_relay") == 1
        # A forged tunnel connection (a guessed number and token) is closed and counted, nothing spliced.
        with socket.create_connection(("127.0.0.1", config.port), timeout=5) as forged:
            forged.sendall(PREAMBLE.pack(1, b"\0" * 32))
            assert forged.recv(1) == b""
        assert relay.value("swarm_node_relay_refused_total", reason="token") == 1
        assert relay.value("swarm_node_relay_refused_total", reason="full") == 1
        assert relay.value("swarm_node_relay_refused_total", reason="swarm") == 1
        # ... and the attached member is still reached.
        with grpc.insecure_channel(member.attached[0][0]) as channel:
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
    finally:
        member.close()
        relay.stop()
        not_relay.stop()
        server.stop(0)


def test_a_member_moves_to_the_next_relay_when_its_relay_dies(config):
    first, second = Relay(config), Relay(replace(config, port=free_port()))
    server, target = health_server()
    member = Member({"QmA": first.endpoint, "QmB": second.endpoint}, target, config)
    try:
        endpoint, via = wait_for(lambda: member.attached, 10, "the member to attach")[0]
        dead = first if via == "QmA" else second
        dead.stop()
        started = time.monotonic()
        wait_for(lambda: len(member.attached) == 2, 10, "the member to attach to the other relay")
        assert time.monotonic() - started < 3
        moved, via2 = member.attached[1]
        assert via2 != via and moved != endpoint
        with grpc.insecure_channel(moved) as channel:
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
    finally:
        member.close()
        first.stop()
        second.stop()
        server.stop(0)
