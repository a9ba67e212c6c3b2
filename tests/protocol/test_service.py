"""Stubs and handlers built from the proto descriptors count the bytes of every message they send and receive."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.generated.swarm.v1 import stage_pb2_grpc as pb_grpc
from protocol.limits import WireLimits
from protocol.service import (MESSAGE_PREFIX_BYTES, STAGE_SERVICE, StageStub, kind_of, stage_service_handler)
from protocol.tensor_frames import encode_frames


class _Meter:
    def __init__(self):
        self.bytes: Counter = Counter()  # (direction, method) -> bytes
        self.messages: Counter = Counter()

    def __call__(self, direction: str, method: str, nbytes: int) -> None:
        self.bytes[direction, method] += nbytes
        self.messages[direction, method] += 1


class _Servicer(pb_grpc.StageServiceServicer):
    def __init__(self):
        self.frames: list[bytes] = []

    def Ping(self, request, context):
        return pb.PingReply(peer_id="me" * 10)

    def Forward(self, frames, context):
        self.frames = list(frames)
        return pb.Ack(queued=3)

    def FetchState(self, request, context):
        for i in range(3):
            yield pb.StateChunk(data=bytes(1000 * (i + 1)))


@pytest.fixture
def served():
    meter, servicer = _Meter(), _Servicer()
    server = grpc.server(ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((stage_service_handler(servicer, meter),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    client = _Meter()
    yield StageStub(channel, client), client, meter, servicer
    channel.close()
    server.stop(0)


def test_each_side_counts_the_frames_the_other_side_counts(served):
    stub, client, server, servicer = served
    stub.Ping(pb.PingRequest(), timeout=5)
    request, reply = pb.PingRequest().SerializeToString(), pb.PingReply(peer_id="me" * 10).SerializeToString()
    assert client.bytes["sent", "Ping"] == server.bytes["received", "Ping"] == len(request) + MESSAGE_PREFIX_BYTES
    assert client.bytes["received", "Ping"] == server.bytes["sent", "Ping"] == len(reply) + MESSAGE_PREFIX_BYTES

    frames = list(encode_frames(pb.Envelope(swarm_id="s", round=1), torch.randn(64, 1024),
                                WireLimits(chunk_bytes=64 * 1024)))
    assert stub.Forward(iter(frames), timeout=5).queued == 3
    assert servicer.frames == frames  # raw frames arrive untouched
    on_wire = sum(len(f) for f in frames) + MESSAGE_PREFIX_BYTES * len(frames)
    assert client.bytes["sent", "Forward"] == server.bytes["received", "Forward"] == on_wire
    assert client.messages["sent", "Forward"] == len(frames) > 1

    chunks = list(stub.FetchState(pb.StateRequest(), timeout=5))
    streamed = sum(c.ByteSize() + MESSAGE_PREFIX_BYTES for c in chunks)
    assert client.bytes["received", "FetchState"] == server.bytes["sent", "FetchState"] == streamed > 6000


def test_every_method_of_the_service_has_a_kind():
    kinds = {m.name: kind_of(m.name) for m in STAGE_SERVICE.methods}
    assert kinds["Forward"] == kinds["Backward"] == "activations"
    assert (kinds["FetchGradients"], kinds["FetchState"], kinds["Ping"]) == ("sync", "state", "control")
