"""gRPC channel and server options shared by the node and the benchmarks, so both measure the same thing."""

from __future__ import annotations

from protocol.limits import WireLimits


def channel_options(limits: WireLimits) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_receive_message_length", limits.grpc_message_bytes),
        # Large activations: let HTTP/2 flow control open wide windows quickly.
        ("grpc.http2.bdp_probe", 1),
        # During a call (a long-polled FetchGradients, a large transfer), ping every 2 s and give up after
        # 3 s without an answer: a peer that hangs (host frozen, cable pulled) fails the call within 5 s.
        ("grpc.keepalive_time_ms", 2_000),
        ("grpc.keepalive_timeout_ms", 3_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        # A peer whose port opens (a forwarded port, a restarted node) is dialed again within 2 s, not after a
        # reconnect backoff grown to minutes while it was unreachable.
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


def server_options(limits: WireLimits) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_receive_message_length", limits.grpc_message_bytes),
        ("grpc.so_reuseport", 0),
        # Accept the clients' 2 s keepalive pings (the default minimum of 5 min would answer GOAWAY).
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 1_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]
