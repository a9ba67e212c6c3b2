"""Every RPC this node refuses is a status with a reason, and is counted in `swarm_node_rpc_errors_total`.

One server interceptor sees every call, so the handlers need no bookkeeping of their own:
- a handler's own refusal (`context.abort`, a `ProtocolError`) is counted with its status;
- a request that does not deserialise becomes INVALID_ARGUMENT with the parser's reason;
- an unexpected exception becomes INTERNAL with the exception named in the reason, and is logged;
- a call that gRPC itself ends while the handler reads it is counted too, when gRPC tells the handler so:
  a message over the size limit (the client sees RESOURCE_EXHAUSTED) or a client that went away; the
  server side cannot tell which, so these count as CANCELLED, or DEADLINE_EXCEEDED once the call's
  deadline has passed. (gRPC may instead end the request stream as if the client had finished, and answer
  on its own: such a call is not counted.)
- a call to a method this node does not serve is counted as UNIMPLEMENTED under method "unknown".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from node.host.metrics import NodeMetrics
from protocol.errors import ProtocolError

log = logging.getLogger(__name__)


class _Malformed:
    """Stands in for a request that did not deserialise, so the handler wrapper can refuse it with a reason."""

    def __init__(self, error: Exception):
        self.error = error


class _EndedByGrpc(Exception):
    """The request stream broke because gRPC ended the call (size limit, client gone, deadline)."""


class RpcGuard(grpc.ServerInterceptor):
    def __init__(self, metrics: NodeMetrics):
        self.metrics = metrics

    def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        method = details.method.rsplit("/", 1)[-1]
        if handler is None:
            self.metrics.rpc_errors.labels(method="unknown", code=grpc.StatusCode.UNIMPLEMENTED.name).inc()
            return None
        kind = ("stream" if handler.request_streaming else "unary") + "_" + \
               ("stream" if handler.response_streaming else "unary")
        behaviour = getattr(handler, kind)
        wrapped = self._guard_streaming(method, behaviour) if handler.response_streaming \
            else self._guard(method, behaviour)
        return handler._replace(**{kind: wrapped, "request_deserializer": _tolerant(handler.request_deserializer)})

    def _guard(self, method: str, behaviour: Callable) -> Callable:
        def guarded(request: Any, context: grpc.ServicerContext):
            try:
                return behaviour(self._checked(request, context), context)
            except BaseException as e:
                self._refuse(method, e, context)
        return guarded

    def _guard_streaming(self, method: str, behaviour: Callable) -> Callable:
        def guarded(request: Any, context: grpc.ServicerContext):
            try:
                yield from behaviour(self._checked(request, context), context)
            except BaseException as e:
                self._refuse(method, e, context)
        return guarded

    def _checked(self, request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            raise ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.error}")
        if isinstance(request, Iterator):
            return _frames(request)
        return request

    def _refuse(self, method: str, error: BaseException, context: grpc.ServicerContext) -> None:
        """Count the refusal, then answer it (or re-raise the handler's own abort)."""
        count = self.metrics.rpc_errors.labels
        if isinstance(error, ProtocolError):
            count(method=method, code=error.code.name).inc()
            context.abort(error.code, error.reason)
        if isinstance(error, _EndedByGrpc):
            remaining = context.time_remaining()
            ended = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
                else grpc.StatusCode.CANCELLED
            count(method=method, code=ended.name).inc()
            context.abort(ended, "the request stream ended early")  # gRPC has ended the call; this only ends ours
        code = _code(context)
        if code is not None and code != grpc.StatusCode.OK:  # the handler aborted with a status of its own
            count(method=method, code=code.name).inc()
            raise error
        if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: not ours to turn into a status
            raise error
        count(method=method, code=grpc.StatusCode.INTERNAL.name).inc()
        log.error("%s failed unexpectedly", method, exc_info=error)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {error!r}")


def _frames(requests: Iterator) -> Iterator:
    try:
        for request in requests:
            if isinstance(request, _Malformed):
                raise ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.error}")
            yield request
    except grpc.RpcError:
        raise _EndedByGrpc() from None


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:  # raw frames: the codec validates them
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:
            return _Malformed(e)
    return parse


def _code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    try:
        return context.code()
    except (AttributeError, NotImplementedError):  # older grpcio
        return None
