"""The server side of the data plane: StageService.

Handlers refuse by raising `ProtocolError` or calling `context.abort`; `node.host.rpc_guard` answers a
ProtocolError with its status, counts every refusal and turns anything unexpected into INTERNAL with a reason.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import grpc

from node import VERSION
from node.stage.admission import HopAdmission
from node.stage.executor import StageExecutor
from node.stage.hop_checks import HOP_CHECK, HopChecks, Refusal, Sample
from node.host.metrics import NodeMetrics
from node.host.stream_guard import StreamGuard
from node.stage.trainer import StageTrainer
from node.stage.witness import Witness
from protocol.envelope import check_envelope, check_path
from protocol.errors import ProtocolError, check_swarm
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.generated.swarm.v1 import stage_pb2_grpc as pb_grpc
from protocol.limits import WireLimits
from protocol.notice_auth import verified_sender
from protocol.rpc_auth import AuthRefused, SwarmAuth
from protocol.state_frames import encode_state
from protocol.tensor_frames import receive_tensor

log = logging.getLogger(__name__)



class GradientSource(Protocol):
    """What answers FetchGradients: the replicas' gradient exchange (node/sync/averaging.py)."""

    def serve(self, request: pb.GradientRequest, names: list[str], timeout: float,
              cancelled: Callable[[], bool]) -> Iterator[pb.StateChunk]: ...

HopRefused = Callable[[pb.Envelope, str, str, str], None]  # (envelope, sender, refusal kind, detail)


class StageServicer(pb_grpc.StageServiceServicer):
    """Registered with `protocol.service.stage_service_handler`: Forward/Backward receive raw frames."""

    def __init__(self, *, swarm: str, peer_id: str, num_stages: int, executor: StageExecutor,
                 trainers: dict[int, StageTrainer], limits: WireLimits, metrics: NodeMetrics, state_wait_s: float,
                 admission: HopAdmission, exchange: GradientSource | None = None,
                 on_failure_report: Callable[[pb.FailureReport, str], None] | None = None,
                 checkpoint_state: Callable[[int], tuple[int, dict, dict] | None] | None = None,
                 auth: SwarmAuth | None = None, guard: StreamGuard | None = None,
                 dial_back: Callable[[pb.ReachabilityRequest, str], pb.ReachabilityReply] | None = None,
                 hop_checks: HopChecks | None = None, on_hop_refused: HopRefused | None = None,
                 witness: Witness | None = None):
        self.swarm = swarm
        self.peer_id = peer_id
        self.num_stages = num_stages
        self.executor = executor
        self.trainers = trainers
        self.limits = limits
        self.metrics = metrics
        self.exchange = exchange
        self.on_failure_report = on_failure_report
        self.checkpoint_state = checkpoint_state  # stage -> (round, tensors, metadata) of a stage we do not host
        self.state_wait_s = state_wait_s  # the longest a FetchState without a deadline waits for its round
        self.auth = auth  # private swarms: Forward/Backward tags are checked here, other calls by the interceptor
        self.admission = admission  # hops and control messages must fit the round's signed plan
        self.guard = guard  # caps streams per peer and in total; cancels silent ones
        self.dial_back = dial_back  # node/host/reachability.py
        self.hop_checks = hop_checks  # is what a peer sent plausible? (node/stage/hop_checks.py)
        self.on_hop_refused = on_hop_refused  # reports a refused hop's sender to the microbatch's origin
        self.witness = witness  # counts the work each peer did for us, for our record (node/stage/witness.py)

    def Forward(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> pb.Ack:
        return self._receive("Forward", request_iterator, context)

    def Backward(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> pb.Ack:
        return self._receive("Backward", request_iterator, context)

    def _receive(self, method: str, frames: Iterator[bytes], context: grpc.ServicerContext) -> pb.Ack:
        started = time.perf_counter()
        try:
            check = None if self.auth is None else (
                lambda env, meta: self.auth.check_frames(method, env, meta, self.peer_id))
            with self._guarded(context) as watch:  # decoded on our device
                received = receive_tensor(watch.frames(frames) if watch else frames, self.limits, check,
                                          device=self.executor.device)
            env, tensor = received.envelope, received.tensor
        except AuthRefused as e:
            self.metrics.auth_refused.labels(method=method, reason=e.kind).inc()
            raise  # node.host.rpc_guard answers and counts it
        check_envelope(env, swarm_id=self.swarm, peer_id=self.peer_id, stages=list(self.trainers),
                       num_stages=self.num_stages, limits=self.limits)
        if self.executor.round <= env.round <= self.executor.round + 1:
            self.admission.check(env)  # other rounds: the executor refuses them without a DHT lookup
        sender = _sender(method, env)
        samples: list[Sample] = []

        def screen() -> None:  # the executor calls it once the hop is well-formed and one it would take
            if self.hop_checks is not None and sender is not None:
                samples.append(self._check_hop(method, env, sender, tensor))

        accept = self.executor.accept_forward if method == "Forward" else self.executor.accept_backward
        queued = accept(env, tensor, screen)
        for sample in samples:
            self.hop_checks.learn(sample)  # only hops we took teach what a stage sends
        judged = any(sample.judged for sample in samples)
        tokens = tensor.shape[0] * tensor.shape[1]  # [batch, seq, hidden], as the executor checked
        if sender is not None and self.witness is not None:
            self.witness.took(sender.peer_id, tokens, judged)
        self.metrics.rpc_seconds.labels(method=method, side="server").observe(time.perf_counter() - started)
        return pb.Ack(queued=queued, tokens=tokens, checked=judged)  # the sender's receipt

    def _check_hop(self, method: str, env: pb.Envelope, sender: pb.Hop, tensor) -> Sample:
        """Refuse an implausible hop, and report its sender (not us, as its failed send would) to the origin."""
        try:
            return self.hop_checks.check("forward" if method == "Forward" else "backward", sender.stage, tensor,
                                         env.round)
        except Refusal as e:
            if self.witness is not None:
                self.witness.refused(sender.peer_id)
            if self.on_hop_refused is not None:
                self.on_hop_refused(env, sender.peer_id, e.kind, e.detail)
            raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{HOP_CHECK}: {e.detail}; reported to the microbatch's origin") from None

    def _guarded(self, context: grpc.ServicerContext):
        return self.guard.stream(context) if self.guard is not None else contextlib.nullcontext()

    def Ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingReply:
        return pb.PingReply(peer_id=self.peer_id, time=time.time())

    def CheckReachability(self, request: pb.ReachabilityRequest, context: grpc.ServicerContext
                          ) -> pb.ReachabilityReply:
        if self.dial_back is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node does not dial back")
        return self.dial_back(request, context.peer())

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoReply:
        return pb.InfoReply(peer_id=self.peer_id, swarm_id=self.swarm, stages=sorted(self.trainers),
                            round=self.executor.round, version=VERSION)

    def FetchState(self, request: pb.StateRequest, context: grpc.ServicerContext) -> Iterator[pb.StateChunk]:
        check_swarm(request.swarm_id, self.swarm)
        trainer = self.trainers.get(request.stage)
        if trainer is None:
            saved = self.checkpoint_state(request.stage) if self.checkpoint_state else None
            if saved is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"this node neither hosts stage {request.stage} nor holds "
                                                         f"a checkpoint of it")
            round_, tensors, metadata = saved
            yield from encode_state(tensors, metadata, round_, self.limits.chunk_bytes)
            return
        if request.min_round >= 0 and not trainer.wait_completed(request.min_round, context.time_remaining() or
                                                                 self.state_wait_s, lambda: not context.is_active()):
            context.abort(grpc.StatusCode.UNAVAILABLE, f"round {request.min_round} did not complete here in time, "
                                                       f"or this node is stopping")
        tensors, metadata = trainer.export(include_grads=request.include_grads)
        yield from encode_state(tensors, metadata, trainer.completed_round, self.limits.chunk_bytes)

    # Control messages act only when signed by the peer the round's plan allows (protocol/notice_auth.py).
    def ReportFailure(self, request: pb.FailureReport, context: grpc.ServicerContext) -> pb.FailureAck:
        check_swarm(request.swarm_id, self.swarm)
        if self.on_failure_report is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this node is not a data node: it originates nothing")
        self.on_failure_report(request, verified_sender("ReportFailure", request, self.peer_id))
        return pb.FailureAck()

    def Reroute(self, request: pb.RerouteNotice, context: grpc.ServicerContext) -> pb.FailureAck:
        check_swarm(request.swarm_id, self.swarm)
        if request.path:  # an empty path: the origin gave the microbatch up
            check_path(request.path, self.num_stages, self.limits)
        self.admission.check_reroute(request, verified_sender("Reroute", request, self.peer_id))
        self.executor.reroute(request.round, request.microbatch, request.attempt, list(request.path))
        return pb.FailureAck()

    def RoundDone(self, request: pb.RoundDoneNotice, context: grpc.ServicerContext) -> pb.FailureAck:
        check_swarm(request.swarm_id, self.swarm)
        self.admission.check_round_done(request, verified_sender("RoundDone", request, self.peer_id))
        self.executor.origin_done(request.round, request.origin)
        return pb.FailureAck()

    def FetchGradients(self, request: pb.GradientRequest, context: grpc.ServicerContext) -> Iterator[pb.StateChunk]:
        check_swarm(request.swarm_id, self.swarm)
        trainer = self.trainers.get(request.stage)
        if trainer is None or self.exchange is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"this node does not host stage {request.stage}")
        yield from self.exchange.serve(request, trainer.names, context.time_remaining() or self.state_wait_s,
                                       lambda: not context.is_active())


def _sender(method: str, env: pb.Envelope) -> pb.Hop | None:
    """The hop that sent this one, as its path names it; None when no hop sends it (the executor refuses it)."""
    index = env.hop - 1 if method == "Forward" else env.hop + 1
    return env.path[index] if 0 <= index < len(env.path) else None
