"""Tensors kept for backward, keyed by (round, microbatch, attempt, hop), bounded by a budget in microbatches."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from protocol.generated.swarm.v1 import stage_pb2 as pb

Key = tuple[int, int, int, int]  # (round, microbatch, attempt, hop)


@dataclass
class Saved:
    stage: int
    inputs: torch.Tensor  # the hop's input: a leaf that receives the gradient to send back (token ids at hop 0)
    outputs: torch.Tensor  # the hop's output, still attached to its autograd graph
    env: pb.Envelope | None = None  # as received: who comes next, and who the origin is
    since: float = field(default_factory=time.monotonic)  # when the forward finished


class ActivationStore:
    """Counts distinct (round, microbatch) pairs, so a node serving two hops of one microbatch uses one slot."""

    def __init__(self, slots: int):
        self.slots = slots
        self._saved: dict[Key, Saved] = {}
        self._reserved: dict[tuple[int, int], int] = {}  # (round, microbatch) -> hops holding or about to hold
        self._lock = threading.Lock()

    def try_reserve(self, round_: int, microbatch: int) -> bool:
        """Claim room for one more hop of this microbatch; False when the budget is spent."""
        with self._lock:
            mb = (round_, microbatch)
            if mb not in self._reserved and len(self._reserved) >= self.slots:
                return False
            self._reserved[mb] = self._reserved.get(mb, 0) + 1
            return True

    def release(self, round_: int, microbatch: int) -> None:
        with self._lock:
            self._release(round_, microbatch)

    def _release(self, round_: int, microbatch: int) -> None:
        mb = (round_, microbatch)
        left = self._reserved.get(mb, 0) - 1
        if left > 0:
            self._reserved[mb] = left
        else:
            self._reserved.pop(mb, None)

    def put(self, key: Key, saved: Saved) -> None:
        with self._lock:
            self._saved[key] = saved

    def contains(self, key: Key) -> bool:
        with self._lock:
            return key in self._saved

    def get(self, key: Key) -> Saved | None:
        with self._lock:
            return self._saved.get(key)

    def pop(self, key: Key) -> Saved | None:
        """Free a hop's tensors (after its backward) and its share of the budget."""
        with self._lock:
            saved = self._saved.pop(key, None)
            if saved is not None:
                self._release(key[0], key[1])
            return saved

    def drop_attempts(self, round_: int, microbatch: int, below: int) -> int:
        """Free a microbatch's hops from attempts before `below` (it was re-routed); returns how many."""
        with self._lock:
            keys = [k for k in self._saved if k[0] == round_ and k[1] == microbatch and k[2] < below]
            for key in keys:
                del self._saved[key]
                self._release(round_, microbatch)
            return len(keys)

    def awaiting_backward(self) -> list[Saved]:
        """Hops whose forward is done and whose gradient has not come back yet."""
        with self._lock:
            return [s for s in self._saved.values() if s.env is not None]

    def drop_round(self, round_: int) -> int:
        """Free everything kept for an aborted round; returns how many hops were dropped."""
        with self._lock:
            keys = [k for k in self._saved if k[0] == round_]
            for key in keys:
                del self._saved[key]
            for mb in [mb for mb in self._reserved if mb[0] == round_]:
                del self._reserved[mb]
            return len(keys)

    def microbatches_held(self) -> int:
        with self._lock:
            return len(self._reserved)
