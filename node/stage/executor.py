"""The compute side of a node: one worker thread runs forward, loss and backward hops in the order
`routing.order` prescribes, the same policy the simulator predicts the swarm with.

A hop arrives as (envelope, tensor). Its envelope's path says which stage runs it and where the result
goes next, so the executor never assumes that stages are visited in order or that any are visited at all.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch

from lm.stage import PipelineStage
from node.stage.activations import ActivationStore, Saved
from node.host.metrics import NodeMetrics
from protocol.envelope import at_hop, is_final_hop
from protocol.errors import ProtocolError, invalid
from protocol.generated.swarm.v1 import stage_pb2 as pb
from routing.order import BACKWARD, FORWARD, LOSS, queue_key

log = logging.getLogger(__name__)

STOP = "stop"


@dataclass(order=True)
class _Task:
    key: tuple  # routing.order.queue_key: loss and backward first, then first-come
    seq: int
    kind: str = field(compare=False)
    env: pb.Envelope = field(compare=False)
    tensor: torch.Tensor = field(compare=False)


class OriginHooks:
    """What a data node's origin learns from the executor. The default ignores everything."""

    def labels(self, round_: int, microbatch: int) -> torch.Tensor | None:
        return None

    def on_loss(self, round_: int, microbatch: int, loss: float, logits: torch.Tensor) -> None: ...

    def on_done(self, round_: int, microbatch: int) -> None: ...

    def on_failed(self, round_: int, microbatch: int, reason: str) -> None: ...


Send = Callable[[str, pb.Envelope, torch.Tensor], None]  # (kind, envelope addressed to the receiver, tensor)


class StageExecutor:
    def __init__(self, peer_id: str, stages: dict[int, PipelineStage], device: torch.device, dtype: torch.dtype,
                 memory_slots: int, metrics: NodeMetrics, send: Send, first_round: int = 0):
        self.peer_id = peer_id
        self.stages = stages
        self.device = device
        self.dtype = dtype
        self.metrics = metrics
        self.send = send
        self.origin: OriginHooks = OriginHooks()
        self.store = ActivationStore(memory_slots)
        self._queue: queue.PriorityQueue[_Task] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._lock = threading.Condition()
        self._round = first_round - 1  # the last round begun
        self._parked: list[_Task] = []  # hops of the next round, held until this node begins it
        # Per microbatch of the current round: its attempt and the hops this node still owes it (a re-route
        # replaces both). None once the round has ended.
        self._expected: dict[int, tuple[int, set[int]]] | None = None
        self._admitted: set[tuple[int, int, int, int]] = set()  # forward hops taken (queued, parked or done)
        # Origins of the current round that may still re-route a microbatch to us: the round stays open
        # until each says it is done (or is declared dead). Notices that arrive early wait in _done_early.
        self._origins_open: set[str] = set()
        self._done_early: set[tuple[int, str]] = set()
        self._done: dict[int, int] = {}  # stage -> backward passes finished this round (what its grads sum)
        self._pending_backward: set[tuple[int, int, int, int]] = set()
        self._compute_s: dict[int, float] = {}
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="executor", daemon=True)

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(_Task((-1,), -1, STOP, pb.Envelope(), torch.empty(0)))
        self._worker.join(timeout=5)

    @property
    def round(self) -> int:
        return self._round

    def resume_at(self, round_: int) -> None:
        """A joining node copied the state after round_ - 1: take hops from `round_` on."""
        with self._lock:
            self._round = round_ - 1

    def compute_seconds(self) -> dict[int, float]:
        return dict(self._compute_s)

    def begin_round(self, round_: int, expected: set[tuple[int, int]], origins: set[str] = frozenset()) -> None:
        """Start serving `round_`: `expected` lists the (microbatch, hop) visits the plan gives this node;
        `origins` the data nodes whose microbatches may still be re-routed here until they say they are done."""
        with self._lock:
            self._round = round_
            self._origins_open = {o for o in origins if (round_, o) not in self._done_early}
            self._done_early = {k for k in self._done_early if k[0] > round_}
            self._expected = {}
            for mb, hop in expected:
                self._expected.setdefault(mb, (0, set()))[1].add(hop)
            self._done = {}
            parked, self._parked = self._parked, []
        for task in parked:
            if task.env.round == round_ and (task.env.microbatch, task.env.hop) in expected:
                self._queue.put(task)
            else:
                self.store.release(task.env.round, task.env.microbatch)
        self.metrics.round.set(round_)

    def wait_round(self, timeout: float, stop: threading.Event) -> bool:
        """Block until every expected visit of the round finished backward (True) or time ran out (False)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._round_complete():
                left = deadline - time.monotonic()
                if left <= 0 or stop.is_set():
                    return False
                self._lock.wait(min(left, 0.25))
            return True

    def _round_complete(self) -> bool:
        return (self._expected is not None and not any(hops for _, hops in self._expected.values())
                and not self._origins_open)

    def origin_done(self, round_: int, origin: str) -> None:
        """`origin` will re-route nothing more in `round_` (it finished, or it is dead)."""
        with self._lock:
            if round_ == self._round and self._expected is not None:
                self._origins_open.discard(origin)
                self._lock.notify_all()
            elif round_ > self._round:
                self._done_early.add((round_, origin))

    def reroute(self, round_: int, microbatch: int, attempt: int, path: list[pb.Hop]) -> int:
        """The origin re-routed a microbatch: expect our hops on its new path, and free what older attempts
        left here. Returns how many kept hops were freed."""
        with self._lock:
            if round_ != self._round or self._expected is None:
                return 0
            current = self._expected.get(microbatch)
            if current is not None and current[0] >= attempt:
                return 0
            self._expected[microbatch] = (attempt, self._my_hops(path))
            self._pending_backward = {k for k in self._pending_backward
                                      if not (k[0] == round_ and k[1] == microbatch and k[2] < attempt)}
            self._lock.notify_all()
        freed = self.store.drop_attempts(round_, microbatch, attempt)
        self.metrics.activations_held.set(self.store.microbatches_held())
        return freed

    def _my_hops(self, path) -> set[int]:
        return {i for i, hop in enumerate(path[:-1]) if hop.peer_id == self.peer_id}

    def awaiting_backward(self):
        """Saved hops of the current round whose gradient has not come back (for failure detection)."""
        return [s for s in self.store.awaiting_backward() if s.env.round == self._round]

    def end_round(self, round_: int) -> dict[int, int]:
        """Close the round: drop whatever it left behind; returns microbatches finished per hosted stage."""
        with self._lock:
            counts = {s: self._done.get(s, 0) for s in self.stages}
            self._expected = None
            self._pending_backward = {k for k in self._pending_backward if k[0] != round_}
            self._admitted = {k for k in self._admitted if k[0] > round_}
        dropped = self.store.drop_round(round_)
        if dropped:
            log.warning("round %d ended with %d hops never backwarded; their activations were dropped",
                        round_, dropped)
        self.metrics.activations_held.set(self.store.microbatches_held())
        return counts

    # ---- admission (called from gRPC threads; raise ProtocolError to refuse) ----------------------------------
    def accept_forward(self, env: pb.Envelope, tensor: torch.Tensor) -> int:
        if env.hop == 0:
            raise invalid("hop 0 is the origin's own: a Forward must address hop 1 or later")
        self._check_hidden(tensor, env)
        if is_final_hop(env):
            self._check_final(env, tensor)
        with self._lock:
            self._check_round(env)
            key = _key(env)
            if key in self._admitted or self.store.contains(key):
                raise ProtocolError(grpc.StatusCode.ALREADY_EXISTS,
                                    f"hop {key} (round, microbatch, attempt, hop) was already received")
            if not self.store.try_reserve(env.round, env.microbatch):
                raise ProtocolError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"activation memory is full ({self.store.slots} microbatches); retry later")
            self._admitted.add(key)
            task = self._task(LOSS if is_final_hop(env) else FORWARD, env, tensor)
            if env.round == self._round + 1:
                self._parked.append(task)
                return len(self._parked)
        self._queue.put(task)
        return self._queue.qsize()

    def accept_backward(self, env: pb.Envelope, tensor: torch.Tensor) -> int:
        key = _key(env)
        saved = self.store.get(key)
        if saved is None or is_final_hop(env):
            raise ProtocolError(grpc.StatusCode.NOT_FOUND,
                                f"no activations kept for round {env.round} microbatch {env.microbatch} hop {env.hop}"
                                f" (unknown, already backwarded, or its round was aborted)")
        if tensor.shape != saved.outputs.shape or tensor.dtype != saved.outputs.dtype:
            raise invalid(f"gradient of shape {list(tensor.shape)} {_name(tensor.dtype)} does not match the output "
                          f"{list(saved.outputs.shape)} {_name(saved.outputs.dtype)}")
        with self._lock:
            if key in self._pending_backward:
                raise ProtocolError(grpc.StatusCode.ALREADY_EXISTS, f"backward for hop {key} was already received")
            self._pending_backward.add(key)
        self._queue.put(self._task(BACKWARD, env, tensor))
        return self._queue.qsize()

    def start_microbatch(self, env: pb.Envelope, input_ids: torch.Tensor) -> bool:
        """The origin's hop 0. False when activation memory is full (the origin waits and retries)."""
        if not self.store.try_reserve(env.round, env.microbatch):
            return False
        self._queue.put(self._task(FORWARD, env, input_ids))
        return True

    def _check_final(self, env: pb.Envelope, hidden: torch.Tensor) -> None:
        """The last hop returns to its origin, which must hold labels of the matching [batch, seq]."""
        labels = self.origin.labels(env.round, env.microbatch)
        if labels is None:
            raise ProtocolError(grpc.StatusCode.NOT_FOUND,
                                f"round {env.round} microbatch {env.microbatch} did not start at this origin")
        if tuple(hidden.shape[:2]) != tuple(labels.shape):
            raise invalid(f"activations of shape {list(hidden.shape)} do not match this microbatch's labels "
                          f"{list(labels.shape)}")
    def _task(self, kind: str, env: pb.Envelope, tensor: torch.Tensor) -> _Task:
        return _Task(queue_key(kind, time.monotonic(), env.microbatch), next(self._seq), kind, env, tensor)

    def _check_round(self, env: pb.Envelope) -> None:
        if env.round < self._round or (env.round == self._round and self._expected is None):
            raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"round {env.round} is over; this node is at round {self._round}")
        if env.round > self._round + 1:
            raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"unknown round {env.round}; this node is at round {self._round}")
        if env.round != self._round:
            return
        attempt, hops = self._expected.get(env.microbatch, (-1, set()))
        if is_final_hop(env):
            if env.attempt < attempt:
                raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"microbatch {env.microbatch} attempt {env.attempt} was re-routed (now attempt "
                                    f"{attempt})")
            return
        if env.attempt > max(attempt, 0):  # re-routed here before (or without) the origin's notice: admit it
            self._expected[env.microbatch] = (env.attempt, self._my_hops(env.path))
            self._pending_backward = {k for k in self._pending_backward
                                      if not (k[0] == env.round and k[1] == env.microbatch and k[2] < env.attempt)}
            self.store.drop_attempts(env.round, env.microbatch, env.attempt)
        elif env.attempt < attempt:
            raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"microbatch {env.microbatch} attempt {env.attempt} was re-routed (now attempt "
                                f"{attempt})")
        elif env.hop not in hops:
            raise ProtocolError(grpc.StatusCode.NOT_FOUND,
                                f"microbatch {env.microbatch} hop {env.hop} is not in round {env.round}'s plan "
                                f"for this node")

    def _check_hidden(self, tensor: torch.Tensor, env: pb.Envelope) -> None:
        config = next(iter(self.stages.values())).config
        if tensor.dtype != self.dtype:
            raise invalid(f"activations are {_name(tensor.dtype)}; this swarm computes in {_name(self.dtype)}")
        if tensor.dim() != 3 or tensor.shape[2] != config.hidden_size:
            raise invalid(f"activations of shape {list(tensor.shape)}; expected [batch, seq, {config.hidden_size}]")
        if tensor.shape[1] > config.max_position_embeddings:
            raise invalid(f"sequence of {tensor.shape[1]} tokens exceeds the model's "
                          f"{config.max_position_embeddings}")

    # ---- compute ---------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            task = self._queue.get()
            if task.kind == STOP:
                return
            try:
                if task.kind in (FORWARD, LOSS):
                    self._forward(task.env, task.tensor)
                else:
                    self._backward(task.env, task.tensor)
            except Exception as e:  # one bad hop must not stop the node
                log.exception("%s of round %d microbatch %d hop %d failed", task.kind, task.env.round,
                              task.env.microbatch, task.env.hop)
                self.store.pop(_key(task.env))
                if task.env.path and task.env.path[0].peer_id == self.peer_id:
                    self.origin.on_failed(task.env.round, task.env.microbatch, str(e))

    def _forward(self, env: pb.Envelope, tensor: torch.Tensor) -> None:
        stage_id = env.path[env.hop].stage
        stage = self.stages[stage_id]
        started = time.perf_counter()
        if is_final_hop(env):
            self._loss_and_head(env, stage, tensor)
            return
        with torch.enable_grad():
            if env.hop == 0:
                inputs = tensor.to(self.device)
                hidden = stage.embed(inputs)
            else:
                inputs = tensor.to(self.device).requires_grad_(True)
                hidden = inputs
            outputs = stage(hidden)
        self.store.put(_key(env), Saved(stage_id, inputs, outputs, env))
        self._note_compute(stage_id, time.perf_counter() - started)
        self.metrics.forwarded.labels(stage=str(stage_id)).inc()
        self.metrics.activations_held.set(self.store.microbatches_held())
        self.send(FORWARD, at_hop(env, env.hop + 1), outputs.detach())

    def _loss_and_head(self, env: pb.Envelope, stage: PipelineStage, tensor: torch.Tensor) -> None:
        labels = self.origin.labels(env.round, env.microbatch)
        with torch.enable_grad():
            hidden = tensor.to(self.device).requires_grad_(True)
            logits = stage.logits(hidden)
            loss = stage.loss(logits, labels.to(self.device))
            loss.backward()
        self.store.release(env.round, env.microbatch)
        self.origin.on_loss(env.round, env.microbatch, loss.item(), logits)
        self.send(BACKWARD, at_hop(env, env.hop - 1), hidden.grad)

    def _backward(self, env: pb.Envelope, grad: torch.Tensor) -> None:
        key = _key(env)
        saved = self.store.pop(key)
        with self._lock:
            self._pending_backward.discard(key)
        if saved is None:  # the round was aborted while this gradient waited
            return
        saved.outputs.backward(grad.to(self.device))
        self.metrics.backwarded.labels(stage=str(saved.stage)).inc()
        self.metrics.activations_held.set(self.store.microbatches_held())
        with self._lock:
            if env.round == self._round and self._expected is not None:
                attempt, hops = self._expected.get(env.microbatch, (-1, set()))
                if attempt == env.attempt:
                    hops.discard(env.hop)
                self._done[saved.stage] = self._done.get(saved.stage, 0) + 1
                self._lock.notify_all()
        if env.hop == 0:
            self.origin.on_done(env.round, env.microbatch)
        else:
            self.send(BACKWARD, at_hop(env, env.hop - 1), saved.inputs.grad)

    def _note_compute(self, stage: int, seconds: float) -> None:
        previous = self._compute_s.get(stage)
        self._compute_s[stage] = seconds if previous is None else 0.8 * previous + 0.2 * seconds


def _key(env: pb.Envelope) -> tuple[int, int, int, int]:
    return env.round, env.microbatch, env.attempt, env.hop


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
