"""Protocol violations carry the gRPC status code that the receiver answers with."""

from __future__ import annotations

import grpc


class ProtocolError(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code.name}: {self.reason}"


def invalid(reason: str) -> ProtocolError:
    return ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, reason)


def check_swarm(theirs: str, ours: str) -> None:
    """A request names the swarm it is for; one for another swarm is refused before anything else."""
    if theirs != ours:
        raise ProtocolError(grpc.StatusCode.PERMISSION_DENIED, f"swarm id {theirs!r} is not this node's")
