"""The RPC guard: every refusal is a status with a reason and is counted, gRPC's own refusals included."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from prometheus_client import generate_latest

from node.host.metrics import NodeMetrics
from node.host.rpc_guard import RpcGuard
from protocol.generated.swarm.v1 import stage_pb2 as pb


@pytest.fixture
def served():
    metrics = NodeMetrics()

    def forward(frames, context):
        for _ in frames:
            pass
        return b"ok"

    def ping(request, context):
        raise ValueError("boom")

    def fetch_state(request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "no such stage")
        yield b""

    server = grpc.server(ThreadPoolExecutor(2), interceptors=[RpcGuard(metrics)],
                         options=[("grpc.max_receive_message_length", 1000)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("svc", {
        "Forward": grpc.stream_unary_rpc_method_handler(forward),
        "Ping": grpc.unary_unary_rpc_method_handler(ping, request_deserializer=pb.PingRequest.FromString),
        "FetchState": grpc.unary_stream_rpc_method_handler(fetch_state,
                                                           request_deserializer=pb.StateRequest.FromString),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield grpc.insecure_channel(f"127.0.0.1:{port}"), metrics
    server.stop(None)


def _refused(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def _counted(metrics: NodeMetrics) -> dict[tuple[str, str], float]:
    out = {}
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith("swarm_node_rpc_errors_total{"):
            labels, value = line[len("swarm_node_rpc_errors_total{"):].split("} ")
            fields = dict(item.split("=") for item in labels.split(","))
            out[(fields["method"].strip('"'), fields["code"].strip('"'))] = float(value)
    return out


def test_every_refusal_has_a_reason_and_is_counted(served):
    channel, metrics = served
    code, details = _refused(lambda: channel.unary_unary("/svc/Ping")(b"", timeout=5))
    assert code == grpc.StatusCode.INTERNAL and "ValueError('boom')" in details
    code, details = _refused(lambda: channel.unary_unary("/svc/Ping")(b"\xff\xff\xff", timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("malformed request")
    code, details = _refused(lambda: list(channel.unary_stream("/svc/FetchState")(b"", timeout=5)))
    assert code == grpc.StatusCode.NOT_FOUND and details == "no such stage"
    # Refused by gRPC itself: one message over the receive limit. gRPC may or may not tell the handler, so
    # whether the guard counts it (as Forward CANCELLED) is left open below.
    code, _ = _refused(lambda: channel.stream_unary("/svc/Forward")(iter([b"x" * 10, b"y" * 5000]), timeout=5))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, _ = _refused(lambda: channel.unary_unary("/svc/Nope")(b"", timeout=5))
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert channel.stream_unary("/svc/Forward")(iter([b"x"]), timeout=5) == b"ok"  # still serving

    counted = _counted(metrics)
    assert counted.pop(("Forward", "CANCELLED"), 0) <= 1
    assert counted == {("Ping", "INTERNAL"): 1, ("Ping", "INVALID_ARGUMENT"): 1, ("FetchState", "NOT_FOUND"): 1,
                       ("unknown", "UNIMPLEMENTED"): 1}
