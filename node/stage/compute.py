"""Stage compute: one worker thread runs forward, loss and backward hops on the hosted `PipelineStage`s in the
order `routing.order` prescribes, the same policy the simulator predicts the swarm with.

A hop's envelope says which stage runs it and where the result goes next, so nothing here assumes that
stages are visited in order or that any are visited at all. What is admitted is decided before a hop is
submitted (node.stage.admission, node.stage.ledger); here it only runs.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lm.stage import PipelineStage
from node.smoothing import ewma
from node.host.metrics import NodeMetrics
from node.stage.activations import ActivationStore, Saved
from node.stage.ledger import RoundLedger, hop_key
from protocol.envelope import at_hop, is_final_hop
from protocol.generated.swarm.v1 import stage_pb2 as pb
from routing.order import BACKWARD, FORWARD, LOSS, queue_key

log = logging.getLogger(__name__)

STOP = "stop"

Send = Callable[[str, pb.Envelope, torch.Tensor], None]  # (kind, envelope addressed to the receiver, tensor)


class OriginHooks:
    """What a data node's origin learns from the compute. The default ignores everything."""

    def labels(self, round_: int, microbatch: int) -> torch.Tensor | None:
        return None

    def on_loss(self, round_: int, microbatch: int, loss: float, logits: torch.Tensor) -> None: ...

    def on_done(self, round_: int, microbatch: int) -> None: ...

    def on_failed(self, round_: int, microbatch: int, reason: str) -> None: ...


@dataclass(order=True)
class Task:
    key: tuple  # routing.order.queue_key: loss and backward first, then first-come
    seq: int
    kind: str = field(compare=False)
    env: pb.Envelope = field(compare=False)
    tensor: torch.Tensor = field(compare=False)


class StageCompute:
    def __init__(self, peer_id: str, stages: dict[int, PipelineStage], device: torch.device, store: ActivationStore,
                 ledger: RoundLedger, metrics: NodeMetrics, send: Send, *, compute_smoothing: float,
                 join_timeout: float, hooks: OriginHooks = OriginHooks()):
        self.peer_id = peer_id
        self.stages = stages
        self.device = device
        self.store = store
        self.ledger = ledger  # told when a backward starts and finishes
        self.metrics = metrics
        self.send = send
        self.hooks = hooks
        self.compute_smoothing = compute_smoothing  # the share of the newest forward in the per-stage mean
        self.join_timeout = join_timeout
        self._queue: queue.PriorityQueue[Task] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._compute_s: dict[int, float] = {}
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="executor", daemon=True)

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(Task((-1,), -1, STOP, pb.Envelope(), torch.empty(0)))
        self._worker.join(timeout=self.join_timeout)

    def task(self, kind: str, env: pb.Envelope, tensor: torch.Tensor) -> Task:
        """A hop ready now, ranked by `routing.order` (it may still wait parked before it is submitted)."""
        return Task(queue_key(kind, time.monotonic(), env.microbatch), next(self._seq), kind, env, tensor)

    def submit(self, task: Task) -> int:
        """Queue a hop for the worker; returns how many hops are queued."""
        self._queue.put(task)
        return self._queue.qsize()

    def compute_seconds(self) -> dict[int, float]:
        """Smoothed seconds of one forward, per hosted stage that ran one."""
        return dict(self._compute_s)

    # ---- the worker ------------------------------------------------------------------------------------------
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
                self.store.pop(hop_key(task.env))
                if task.env.path and task.env.path[0].peer_id == self.peer_id:
                    self.hooks.on_failed(task.env.round, task.env.microbatch, str(e))

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
        self.store.put(hop_key(env), Saved(stage_id, inputs, outputs, env))
        self._note_compute(stage_id, time.perf_counter() - started)
        self.metrics.forwarded.labels(stage=str(stage_id)).inc()
        self.metrics.activations_held.set(self.store.microbatches_held())
        self.send(FORWARD, at_hop(env, env.hop + 1), outputs.detach())

    def _loss_and_head(self, env: pb.Envelope, stage: PipelineStage, tensor: torch.Tensor) -> None:
        labels = self.hooks.labels(env.round, env.microbatch)
        with torch.enable_grad():
            hidden = tensor.to(self.device).requires_grad_(True)
            logits = stage.logits(hidden)
            loss = stage.loss(logits, labels.to(self.device))
            loss.backward()
        self.store.release(env.round, env.microbatch)
        self.hooks.on_loss(env.round, env.microbatch, loss.item(), logits)
        self.send(BACKWARD, at_hop(env, env.hop - 1), hidden.grad)

    def _backward(self, env: pb.Envelope, grad: torch.Tensor) -> None:
        key = hop_key(env)
        saved = self.store.pop(key)
        self.ledger.backward_started(key)
        if saved is None:  # the round was aborted while this gradient waited
            return
        saved.outputs.backward(grad.to(self.device))
        self.metrics.backwarded.labels(stage=str(saved.stage)).inc()
        self.metrics.activations_held.set(self.store.microbatches_held())
        self.ledger.hop_done(env, saved.stage)
        if env.hop == 0:
            self.hooks.on_done(env.round, env.microbatch)
        else:
            self.send(BACKWARD, at_hop(env, env.hop - 1), saved.inputs.grad)

    def _note_compute(self, stage: int, seconds: float) -> None:
        self._compute_s[stage] = ewma(self._compute_s.get(stage), seconds, self.compute_smoothing)
