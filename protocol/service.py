"""StageService registration and client stubs with raw-bytes Forward and Backward.

Forward and Backward frames are serialised `TensorChunk`s handled by `tensor_frames` directly (one copy
per side); the other methods use the generated protobuf code. The wire format is exactly the one in
proto/swarm/v1/stage.proto, so clients generated from it in any language interoperate.
"""

from __future__ import annotations

import grpc

from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.generated.swarm.v1 import stage_pb2_grpc as pb_grpc

SERVICE = "swarm.v1.StageService"


def stage_service_handler(servicer: pb_grpc.StageServiceServicer) -> grpc.GenericRpcHandler:
    """Server side: Forward/Backward receive an iterator of raw frames; the rest get protobuf messages."""
    def frames(method):
        return grpc.stream_unary_rpc_method_handler(method, request_deserializer=None,
                                                    response_serializer=pb.Ack.SerializeToString)
    def unary(method, request, reply):
        return grpc.unary_unary_rpc_method_handler(method, request_deserializer=request.FromString,
                                                   response_serializer=reply.SerializeToString)

    def streamed(method, request):
        return grpc.unary_stream_rpc_method_handler(method, request_deserializer=request.FromString,
                                                    response_serializer=pb.StateChunk.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Forward": frames(servicer.Forward),
        "Backward": frames(servicer.Backward),
        "Ping": unary(servicer.Ping, pb.PingRequest, pb.PingReply),
        "Info": unary(servicer.Info, pb.InfoRequest, pb.InfoReply),
        "FetchState": streamed(servicer.FetchState, pb.StateRequest),
        "ReportFailure": unary(servicer.ReportFailure, pb.FailureReport, pb.FailureAck),
        "Reroute": unary(servicer.Reroute, pb.RerouteNotice, pb.FailureAck),
        "RoundDone": unary(servicer.RoundDone, pb.RoundDoneNotice, pb.FailureAck),
        "FetchGradients": streamed(servicer.FetchGradients, pb.GradientRequest),
        "CheckReachability": unary(servicer.CheckReachability, pb.ReachabilityRequest, pb.ReachabilityReply),
    })


class StageStub(pb_grpc.StageServiceStub):
    """Client side: Forward/Backward send an iterator of raw frames (`tensor_frames.encode_frames`)."""

    def __init__(self, channel: grpc.Channel):
        super().__init__(channel)
        self.Forward = channel.stream_unary(f"/{SERVICE}/Forward", request_serializer=None,
                                            response_deserializer=pb.Ack.FromString)
        self.Backward = channel.stream_unary(f"/{SERVICE}/Backward", request_serializer=None,
                                             response_deserializer=pb.Ack.FromString)
