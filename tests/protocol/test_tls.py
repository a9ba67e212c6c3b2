"""TLS derived from the swarm key: holders of the key make the same certificate and trust each other;
a node with another key, or a plaintext client, cannot connect."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from node.dataplane.transport import StageClients
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.generated.swarm.v1 import stage_pb2_grpc as pb_grpc
from protocol.limits import WireLimits
from protocol.service import StageStub, stage_service_handler
from protocol.tls import SwarmTls


class _Pong(pb_grpc.StageServiceServicer):
    def Ping(self, request, context):
        return pb.PingReply(peer_id="me")


@pytest.fixture
def server():
    key = os.urandom(32)
    tls = SwarmTls.derived(key)
    srv = grpc.server(ThreadPoolExecutor(2))
    srv.add_generic_rpc_handlers((stage_service_handler(_Pong()),))
    port = srv.add_secure_port("127.0.0.1:0", tls.server_credentials())
    srv.start()
    yield key, f"127.0.0.1:{port}"
    srv.stop(0)


def test_same_key_same_certificate_and_a_working_channel(server):
    key, endpoint = server
    assert SwarmTls.derived(key) == SwarmTls.derived(key)
    clients = StageClients(WireLimits(), tls=SwarmTls.derived(key))
    try:
        assert clients.stub(endpoint, receiver="me").Ping(pb.PingRequest(), timeout=10).peer_id == "me"
    finally:
        clients.close()


def test_another_key_or_plaintext_cannot_connect(server):
    _, endpoint = server
    stranger = StageClients(WireLimits(), tls=SwarmTls.derived(os.urandom(32)))
    try:
        for stub in (stranger.stub(endpoint, receiver="me"), StageStub(grpc.insecure_channel(endpoint))):
            with pytest.raises(grpc.RpcError) as e:
                stub.Ping(pb.PingRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stranger.close()
