"""gRPC channel and server options shared by the node and the benchmarks, so both measure the same thing."""

from __future__ import annotations

from protocol.limits import WireLimits


def channel_options(limits: WireLimits) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        # Large activations: let HTTP/2 flow control open wide windows quickly.
        ("grpc.http2.bdp_probe", 1),
        ("grpc.keepalive_time_ms", 30_000),
    ]


def server_options(limits: WireLimits) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
