"""`swarm-node health`: ask a node's gRPC health service whether it is serving (the container health check)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("health", help="exit 0 if the node at --endpoint is serving, 1 if not")
    p.add_argument("--endpoint", default="127.0.0.1:31330", help="HOST:PORT of the node's gRPC server "
                                                                 "(default: 127.0.0.1:31330, the container's)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default: 3)")
    p.add_argument("--swarm-key", metavar="PATH", default="", help="with --tls: the swarm key the certificate "
                                                                     "is derived from")
    p.add_argument("--tls", action="store_true", help="the node serves TLS (certificate from --swarm-key)")
    p.add_argument("--tls-cert", metavar="PATH", default="", help="the node serves TLS with this certificate")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(args.endpoint)
    if args.tls_cert or args.tls:
        from node.errors import UsageError
        from protocol.swarm_key import load_key_file
        from protocol.tls import SwarmTls

        try:
            tls = SwarmTls(Path(args.tls_cert).read_bytes(), b"") if args.tls_cert else \
                SwarmTls.derived(load_key_file(args.swarm_key))
        except (OSError, ValueError) as e:
            raise UsageError(str(e)) from None
        channel = grpc.secure_channel(args.endpoint, tls.channel_credentials(), options=tls.channel_options())
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"swarm-node: {args.endpoint}: {e.code().name} {e.details() or ''}".rstrip())
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"swarm-node: {args.endpoint}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
