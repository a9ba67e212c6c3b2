"""A data node's origin: it samples microbatches, starts them at hop 0, and collects their losses.

Every microbatch starts and ends here (SkipPipe's stage 0 is never skipped). At most `max_inflight`
microbatches of this node are in the pipeline at once.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from lm.data import TokenStream
from node.executor import OriginHooks, StageExecutor
from protocol.envelope import make_envelope
from protocol.records import PlannedMicrobatch

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    losses: dict[int, float] = field(default_factory=dict)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # only with keep_logits
    failed: dict[int, str] = field(default_factory=dict)
    tokens: int = 0

    @property
    def mean_loss(self) -> float | None:
        return sum(self.losses.values()) / len(self.losses) if self.losses else None


class Origin(OriginHooks):
    def __init__(self, swarm: str, executor: StageExecutor, data: TokenStream, batch_size: int, seq_len: int,
                 max_inflight: int, seed: int, keep_logits: bool = False):
        self.swarm = swarm
        self.executor = executor
        self.data = data
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.max_inflight = max_inflight
        self.seed = seed
        self.keep_logits = keep_logits
        self._cv = threading.Condition()
        self._labels: dict[tuple[int, int], torch.Tensor] = {}
        self._open: set[tuple[int, int]] = set()
        self._result = RoundResult()
        executor.origin = self

    # ---- hooks the executor calls ----------------------------------------------------------------------------
    def labels(self, round_: int, microbatch: int) -> torch.Tensor | None:
        with self._cv:
            return self._labels.get((round_, microbatch))

    def on_loss(self, round_: int, microbatch: int, loss: float, logits: torch.Tensor) -> None:
        with self._cv:
            if (round_, microbatch) in self._open:
                self._result.losses[microbatch] = loss
                if self.keep_logits:
                    self._result.logits[microbatch] = logits.detach()

    def on_done(self, round_: int, microbatch: int) -> None:
        self._close(round_, microbatch, None)

    def on_failed(self, round_: int, microbatch: int, reason: str) -> None:
        self._close(round_, microbatch, reason)

    def interrupt(self) -> None:
        """Wake `run_round`'s waits (the node is stopping; they re-check their stop event)."""
        with self._cv:
            self._cv.notify_all()

    def _close(self, round_: int, microbatch: int, failure: str | None) -> None:
        with self._cv:
            if (round_, microbatch) not in self._open:
                return
            self._open.discard((round_, microbatch))
            self._labels.pop((round_, microbatch), None)
            if failure is None:
                self._result.tokens += self.batch_size * self.seq_len
            else:
                self._result.failed[microbatch] = failure
                self._result.losses.pop(microbatch, None)
            self._cv.notify_all()

    # ---- driving a round -------------------------------------------------------------------------------------
    def sample(self, round_: int, microbatch: int) -> torch.Tensor:
        """Deterministic in (seed, round, microbatch): a re-sent microbatch carries the same tokens."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + round_) * 1_000_003 + microbatch)
        return self.data.sample(gen, self.batch_size, self.seq_len)

    def run_round(self, round_: int, microbatches: list[PlannedMicrobatch], deadline: float,
                  stop: threading.Event, inputs: dict[int, torch.Tensor] | None = None) -> RoundResult:
        """Feed this node's microbatches of the round and wait for them; `inputs` overrides sampling."""
        with self._cv:
            self._result = RoundResult()
        for mb in microbatches:
            ids = inputs[mb.id] if inputs is not None else self.sample(round_, mb.id)
            with self._cv:
                if not self._cv.wait_for(lambda: len(self._open) < self.max_inflight or stop.is_set(),
                                         max(0.0, deadline - time.monotonic())) or stop.is_set():
                    break
                self._labels[(round_, mb.id)] = ids
                self._open.add((round_, mb.id))
            env = make_envelope(self.swarm, round_, mb.id, mb.path, hop=0)
            while not self.executor.start_microbatch(env, ids):  # our own activation memory is full
                if stop.is_set() or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        with self._cv:
            self._cv.wait_for(lambda: not self._open or stop.is_set(), max(0.0, deadline - time.monotonic()))
            for key in list(self._open):
                self._result.failed[key[1]] = "timed out"
                self._result.losses.pop(key[1], None)  # a loss counts only with its tokens
                self._labels.pop(key, None)
            self._open.clear()
            return self._result
