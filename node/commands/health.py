"""`swarm-node health`: ask a node's gRPC health service whether it is serving (the container health check)."""

from __future__ import annotations

import argparse

from node.commands.options import tls_options


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("health", help="exit 0 if the node at --endpoint is serving, 1 if not")
    p.add_argument("--endpoint", default="127.0.0.1:31330", help="HOST:PORT of the node's gRPC server "
                                                                 "(default: 127.0.0.1:31330, the container's)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default: 3)")
    p.add_argument("--swarm-key", metavar="PATH", default="", help="with --tls: the swarm key the certificate "
                                                                     "is derived from")
    tls_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from node.dataplane.transport import dial
    from node.host.trust import client_tls
    from protocol.rpc_auth import UNBOUND

    channel, _ = dial(args.endpoint, [], None, client_tls(args.swarm_key, args.tls, args.tls_cert), UNBOUND)
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
