"""Gradient averaging among the replicas of one stage, with hivemind's DecentralizedAverager.

Replicas first meet at a DHT barrier (each posts how many microbatches it processed), then run one
all-reduce weighted by those counts. The shared buffer is float64: hivemind hands each peer
`local + (average - local)`, which in float32 differs between peers by an ulp (measured). In float64
the difference disappears when the result is rounded back to float32, unless an element's two values
straddle a float32 rounding boundary (odds about 2^-29 per element), so replicas stay bit-identical
in practice; the weights digest in each round's event shows it.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.dht import DHT

log = logging.getLogger(__name__)
_STOP_CHECK_S = 0.1  # how often a waiting step looks at the stop event


class _Stopped(Exception):
    """The node began to stop while averaging."""


class StageGradientAverager:
    def __init__(self, dht: DHT, swarm: str, stage: int, shapes: list[torch.Size], timeout: float,
                 stop: threading.Event | None = None, shutdown_timeout: float = 5.0):
        self.stage = stage
        self.stop = stop or threading.Event()
        self.shapes = shapes
        self.sizes = [s.numel() for s in shapes]
        self.timeout = timeout
        buffer = torch.zeros(sum(self.sizes), dtype=torch.float64)
        # Created before the node starts threads: the averager is a forked process.
        self.averager = DecentralizedAverager(
            [buffer], dht, start=True, prefix=f"{swarm}_grad_stage{stage}", min_group_size=2,
            min_matchmaking_time=1.0, request_timeout=0.5, allreduce_timeout=timeout,
            shutdown_timeout=shutdown_timeout, daemon=True)

    def average(self, grads: list[torch.Tensor], weight: float, group_size: int) -> tuple[list[torch.Tensor], int]:
        """Weighted average of `grads` across replicas; returns (grads, peers that took part).

        On failure the local gradients come back unchanged, with 1 peer.
        """
        with self.averager.get_tensors() as (buffer,):
            buffer.copy_(torch.cat([g.detach().reshape(-1).to("cpu", torch.float64) for g in grads]))
        try:
            group = self._step(weight)
        except _Stopped:
            return grads, 1
        except Exception as e:  # hivemind raises a variety of errors on a failed all-reduce
            log.warning("stage %d averaging failed: %r", self.stage, e)
            group = None
        peers = len(group) if group else 1
        if group is None:
            return grads, 1
        with self.averager.get_tensors() as (buffer,):
            flat = buffer.clone()
        out = [piece.view(shape).to(g.device, g.dtype) for piece, shape, g in
               zip(flat.split(self.sizes), self.shapes, grads)]
        if peers != group_size:
            log.warning("stage %d averaged with %d of %d replicas", self.stage, peers, group_size)
        return out, peers

    def _step(self, weight: float):
        """hivemind's step, in a helper thread so that a stop interrupts it: a hung averager process would
        otherwise block even its start (hivemind waits for the process's reply without a timeout)."""
        outcome: Future = Future()

        def step() -> None:
            try:
                outcome.set_result(self.averager.step(weight=float(weight), timeout=self.timeout, allow_retries=True))
            except BaseException as e:
                outcome.set_exception(e)
        threading.Thread(target=step, name=f"averaging-{self.stage}", daemon=True).start()
        while not self.stop.is_set():
            try:
                return outcome.result(timeout=_STOP_CHECK_S)
            except TimeoutError:
                continue
        raise _Stopped()

    def shutdown(self) -> None:
        self.averager.shutdown()
