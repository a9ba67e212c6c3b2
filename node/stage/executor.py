"""The executor: a node's hops from arrival to their last backward, behind one API for the rest of the node.

It composes three parts, each testable alone:
- `node.stage.admission`: which tensors may enter (dtype, shapes, a final hop's labels, a gradient's match);
- `node.stage.ledger.RoundLedger`: what the current round expects, holds and has finished;
- `node.stage.compute.StageCompute`: the worker thread that runs forward, loss and backward on the stages.

Admission methods are called from gRPC threads and raise ProtocolError to refuse. Freeing activations is
done here, since the ledger holds no tensors and compute decides nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection

import grpc
import torch

from lm.stage import PipelineStage
from node.host.metrics import NodeMetrics
from node.stage.activations import ActivationStore, Saved
from node.stage.admission import check_final, check_gradient, check_hidden
from node.stage.compute import OriginHooks, Send, StageCompute
from node.stage.ledger import RoundLedger, hop_key
from protocol.envelope import is_final_hop
from protocol.errors import ProtocolError, invalid
from protocol.generated.swarm.v1 import stage_pb2 as pb
from routing.order import BACKWARD, FORWARD, LOSS

log = logging.getLogger(__name__)

Screen = Callable[[], None]  # a last check of a hop before it is taken; refuses by raising


class StageExecutor:
    def __init__(self, peer_id: str, stages: dict[int, PipelineStage], device: torch.device, dtype: torch.dtype,
                 memory_slots: int, metrics: NodeMetrics, send: Send, *, recheck_s: float, compute_smoothing: float,
                 join_timeout: float, first_round: int = 0, hooks: OriginHooks = OriginHooks()):
        self.peer_id = peer_id
        self.stages = stages
        self.device = device
        self.dtype = dtype
        self.metrics = metrics
        self.send = send
        self._hooks = hooks  # fixed for the executor's life: compute holds the same object
        self.store = ActivationStore(memory_slots)
        self.ledger = RoundLedger(peer_id, recheck_s, first_round)
        self.compute = StageCompute(peer_id, stages, device, self.store, self.ledger, metrics, send, hooks=hooks,
                                    compute_smoothing=compute_smoothing, join_timeout=join_timeout)

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.compute.start()

    def stop(self) -> None:
        self.compute.stop()

    @property
    def round(self) -> int:
        return self.ledger.round

    def resume_at(self, round_: int) -> None:
        """A joining node copied the state after round_ - 1: take hops from `round_` on."""
        self.ledger.resume_at(round_)

    def compute_seconds(self) -> dict[int, float]:
        return self.compute.compute_seconds()

    # ---- rounds ----------------------------------------------------------------------------------------------
    def begin_round(self, round_: int, expected: Collection[tuple[int, int]],
                    origins: Collection[str] = frozenset()) -> None:
        """Start serving `round_`: `expected` lists the (microbatch, hop) visits the plan gives this node;
        `origins` the data nodes whose microbatches may still be re-routed here until they say they are done."""
        run, dropped = self.ledger.begin_round(round_, expected, origins)
        for task in run:
            self.compute.submit(task)
        for env in dropped:  # parked hops the plan does not have: their slots were reserved on admission
            self.store.release(env.round, env.microbatch)
        self.metrics.round.set(round_)

    def wait_round(self, timeout: float, stop: threading.Event) -> bool:
        """Block until every expected visit of the round finished backward (True) or time ran out (False)."""
        return self.ledger.wait_round(timeout, stop.is_set)

    def origin_done(self, round_: int, origin: str) -> None:
        """`origin` will re-route nothing more in `round_` (it finished, or it is dead)."""
        self.ledger.origin_done(round_, origin)

    def reroute(self, round_: int, microbatch: int, attempt: int, path: list[pb.Hop]) -> int:
        """The origin re-routed a microbatch: expect our hops on its new path, and free what older attempts
        left here. Returns how many kept hops were freed."""
        if not self.ledger.adopt_attempt(round_, microbatch, attempt, path):
            return 0
        freed = self.store.drop_attempts(round_, microbatch, attempt)
        self.metrics.activations_held.set(self.store.microbatches_held())
        return freed

    def awaiting_backward(self) -> list[Saved]:
        """Saved hops of the current round whose gradient has not come back (for failure detection)."""
        return [s for s in self.store.awaiting_backward() if s.env.round == self.ledger.round]

    def end_round(self, round_: int) -> dict[int, int]:
        """Close the round: drop whatever it left behind; returns microbatches finished per hosted stage."""
        done = self.ledger.end_round(round_)
        dropped = self.store.drop_round(round_)
        if dropped:
            log.warning("round %d ended with %d hops never backwarded; their activations were dropped",
                        round_, dropped)
        self.metrics.activations_held.set(self.store.microbatches_held())
        return {s: done.get(s, 0) for s in self.stages}

    # ---- admission (called from gRPC threads; raise ProtocolError to refuse) ----------------------------------
    def accept_forward(self, env: pb.Envelope, tensor: torch.Tensor, screen: Screen = lambda: None) -> int:
        """Take a forward hop a peer sent; `screen` (the hop checks) runs once the hop is known to be one this
        node would take, before memory is reserved, and refuses by raising."""
        if env.hop == 0:
            raise invalid("hop 0 is the origin's own: a Forward must address hop 1 or later")
        check_hidden(tensor, self.dtype, next(iter(self.stages.values())).config)
        if is_final_hop(env):
            check_final(env, tensor, self._hooks.labels(env.round, env.microbatch))
        with self.ledger.lock:  # check, reserve and record as one step: two copies of a hop race here
            if self.ledger.check_forward(env):
                self.ledger.adopt_attempt(env.round, env.microbatch, env.attempt, env.path)
                self.store.drop_attempts(env.round, env.microbatch, env.attempt)
            key = hop_key(env)
            if self.ledger.admitted(key) or self.store.contains(key):
                raise ProtocolError(grpc.StatusCode.ALREADY_EXISTS,
                                    f"hop {key} (round, microbatch, attempt, hop) was already received")
            screen()
            if not self.store.try_reserve(env.round, env.microbatch):
                raise ProtocolError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"activation memory is full ({self.store.slots} microbatches); retry later")
            self.ledger.admit(key)
            task = self.compute.task(LOSS if is_final_hop(env) else FORWARD, env, tensor)
            if env.round == self.ledger.round + 1:
                return self.ledger.park(env, task)
        return self.compute.submit(task)

    def accept_backward(self, env: pb.Envelope, tensor: torch.Tensor, screen: Screen = lambda: None) -> int:
        """Take a gradient a peer sent for a hop we ran; `screen` as for `accept_forward`."""
        key = hop_key(env)
        saved = self.store.get(key)
        if saved is None or is_final_hop(env):
            raise ProtocolError(grpc.StatusCode.NOT_FOUND,
                                f"no activations kept for round {env.round} microbatch {env.microbatch} hop {env.hop}"
                                f" (unknown, already backwarded, or its round was aborted)")
        check_gradient(tensor, saved.outputs)
        screen()
        self.ledger.claim_backward(key)
        return self.compute.submit(self.compute.task(BACKWARD, env, tensor))

    def start_microbatch(self, env: pb.Envelope, input_ids: torch.Tensor) -> bool:
        """The origin's hop 0. False when activation memory is full (the origin waits and retries)."""
        if not self.store.try_reserve(env.round, env.microbatch):
            return False
        self.compute.submit(self.compute.task(FORWARD, env, input_ids))
        return True
