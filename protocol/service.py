"""Client stubs and server handlers for the swarm's gRPC services, built from their proto descriptors.

Every message passes a `FrameMeter` as it is serialised or parsed, so byte counters count the frames that
were actually sent and received: each message's bytes plus gRPC's 5-byte message prefix (HTTP/2 framing
below it is not counted). Forward and Backward requests are serialised `TensorChunk`s handled by
`tensor_frames` directly (one copy per side); the other messages use the generated protobuf classes. The
wire format is exactly the one in proto/swarm/v1/, so clients generated from it in any language interoperate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from protocol.generated.swarm.v1 import experts_pb2, relay_pb2, stage_pb2

STAGE_SERVICE: ServiceDescriptor = stage_pb2.DESCRIPTOR.services_by_name["StageService"]
EXPERT_SERVICE: ServiceDescriptor = experts_pb2.DESCRIPTOR.services_by_name["ExpertService"]
RELAY_SERVICE: ServiceDescriptor = relay_pb2.DESCRIPTOR.services_by_name["RelayService"]
SERVICE = STAGE_SERVICE.full_name  # the stage service's name, e.g. for health checks

RAW_FRAMES = frozenset({"Forward", "Backward"})  # requests that travel as already-serialised TensorChunks
MESSAGE_PREFIX_BYTES = 5  # gRPC's length prefix of every message: a flag byte and a 4-byte length

# What each method's bytes are, for the byte counters: the data plane's kinds of traffic.
ACTIVATIONS, SYNC, STATE, EXPERTS, CONTROL = "activations", "sync", "state", "experts", "control"
_KINDS = {"Forward": ACTIVATIONS, "Backward": ACTIVATIONS, "FetchGradients": SYNC, "FetchState": STATE,
          "FetchExpert": EXPERTS}
KINDS = (ACTIVATIONS, SYNC, STATE, EXPERTS, CONTROL)


def kind_of(method: str) -> str:
    """The kind of traffic a method's messages carry; everything not listed is a control message."""
    return _KINDS.get(method, CONTROL)


class FrameMeter(Protocol):
    def __call__(self, direction: str, method: str, nbytes: int) -> None:
        """`direction` is "sent" or "received"; `nbytes` one message's bytes on the wire, prefix included."""


def no_meter(direction: str, method: str, nbytes: int) -> None:
    pass


def _serializer(method: MethodDescriptor, direction: str, meter: FrameMeter, raw: bool) -> Callable[[object], bytes]:
    def serialize(message) -> bytes:
        data = message if raw else message.SerializeToString()
        meter(direction, method.name, len(data) + MESSAGE_PREFIX_BYTES)
        return data
    return serialize


def _parser(method: MethodDescriptor, message_type, direction: str, meter: FrameMeter, raw: bool
            ) -> Callable[[bytes], object]:
    def parse(data: bytes):
        meter(direction, method.name, len(data) + MESSAGE_PREFIX_BYTES)
        return data if raw else message_type.FromString(data)
    return parse


class ServiceStub:
    """Client side of a service: one callable attribute per method, named as in the proto."""

    def __init__(self, channel: grpc.Channel, service: ServiceDescriptor, meter: FrameMeter = no_meter):
        for method in service.methods:
            open_call = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                         (True, False): channel.stream_unary, (True, True): channel.stream_stream}[
                (method.client_streaming, method.server_streaming)]
            setattr(self, method.name, open_call(
                f"/{service.full_name}/{method.name}",
                request_serializer=_serializer(method, "sent", meter, method.name in RAW_FRAMES),
                response_deserializer=_parser(method, GetMessageClass(method.output_type), "received", meter,
                                              raw=False)))


class StageStub(ServiceStub):
    """The stage service's client: Forward/Backward send an iterator of raw frames (`tensor_frames.encode_frames`)."""

    def __init__(self, channel: grpc.Channel, meter: FrameMeter = no_meter):
        super().__init__(channel, STAGE_SERVICE, meter)


class ExpertStub(ServiceStub):
    def __init__(self, channel: grpc.Channel, meter: FrameMeter = no_meter):
        super().__init__(channel, EXPERT_SERVICE, meter)


class RelayStub(ServiceStub):
    def __init__(self, channel: grpc.Channel, meter: FrameMeter = no_meter):
        super().__init__(channel, RELAY_SERVICE, meter)


def service_handler(service: ServiceDescriptor, servicer: object, meter: FrameMeter = no_meter
                    ) -> grpc.GenericRpcHandler:
    """Server side: each method of `servicer` named as in the proto. Raw-frame methods get an iterator of bytes."""
    handlers = {}
    for method in service.methods:
        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_parser(method, GetMessageClass(method.input_type), "received", meter,
                                         raw=method.name in RAW_FRAMES),
            response_serializer=_serializer(method, "sent", meter, raw=False))
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def stage_service_handler(servicer: object, meter: FrameMeter = no_meter) -> grpc.GenericRpcHandler:
    return service_handler(STAGE_SERVICE, servicer, meter)


def expert_service_handler(servicer: object, meter: FrameMeter = no_meter) -> grpc.GenericRpcHandler:
    return service_handler(EXPERT_SERVICE, servicer, meter)


def relay_service_handler(servicer: object, meter: FrameMeter = no_meter) -> grpc.GenericRpcHandler:
    return service_handler(RELAY_SERVICE, servicer, meter)
