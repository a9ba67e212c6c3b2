"""A data node's origin: it samples microbatches, starts them at hop 0, and collects their losses.

Every microbatch starts and ends here (SkipPipe's stage 0 is never skipped). At most `max_inflight`
microbatches of this node are in the pipeline at once.

Two parts, so that the executor, the origin and the fault component can be built in order, each given
the ones before it:
- `OriginBook` is what the origin knows of the round: its open microbatches, their labels and attempts,
  the peers to avoid, and the result. The executor reports losses and completions into it (`OriginHooks`),
  and the fault component reads and updates it when it re-routes a microbatch (`node/faults/faults.py`).
- `Origin` drives a round: it fills the book, starts microbatches, and waits for them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lm.data import TokenStream
from node.stage.compute import OriginHooks
from node.stage.executor import StageExecutor
from protocol.envelope import HopSpec, make_envelope
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.records import PlannedMicrobatch, RoundPlan


@dataclass
class RoundResult:
    losses: dict[int, float] = field(default_factory=dict)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # only with keep_logits
    failed: dict[int, str] = field(default_factory=dict)
    tokens: int = 0
    reroutes: int = 0

    @property
    def mean_loss(self) -> float | None:
        return sum(self.losses.values()) / len(self.losses) if self.losses else None


@dataclass(frozen=True)
class Failed:
    """A current attempt of an open microbatch whose hop failed: what re-routing it needs."""

    plan: RoundPlan
    attempt: int  # the attempt that failed
    input_ids: torch.Tensor
    avoid: frozenset[str]  # peers that failed a hop of ours this round


class OriginBook(OriginHooks):
    """The origin's microbatches of the current round. Thread-safe: the executor's worker, the fault
    component and the round loop all use it."""

    def __init__(self, tokens_per_microbatch: int):
        self.tokens_per_microbatch = tokens_per_microbatch
        self.cv = threading.Condition()
        self.deadline = 0.0
        self.stop = threading.Event()
        self._keep_logits = False
        self._labels: dict[tuple[int, int], torch.Tensor] = {}
        self._open: set[tuple[int, int]] = set()
        self._attempts: dict[int, int] = {}  # microbatch -> its current attempt
        # (round, microbatch) -> the peers of every path its attempts took, this round and the last: who may report
        self._paths: dict[tuple[int, int], set[str]] = {}
        self._avoid: set[str] = set()
        self._plan: RoundPlan | None = None
        self._result = RoundResult()

    # ---- the round's lifetime (the origin) -----------------------------------------------------------------
    def open_round(self, plan: RoundPlan | None, deadline: float, stop: threading.Event, keep_logits: bool) -> None:
        with self.cv:
            self._result, self._attempts, self._avoid = RoundResult(), {}, set()
            self._plan, self.deadline, self.stop, self._keep_logits = plan, deadline, stop, keep_logits

    def add(self, round_: int, microbatch: int, input_ids: torch.Tensor, path: Sequence[HopSpec]) -> None:
        with self.cv:
            self._labels[(round_, microbatch)] = input_ids
            for old in [k for k in self._paths if k[0] < round_ - 1]:
                del self._paths[old]
            self._paths[(round_, microbatch)] = {h.peer_id for h in path}
            self._open.add((round_, microbatch))

    def in_flight(self) -> int:
        with self.cv:
            return len(self._open)

    def close_round(self, never_started: Sequence[int] = ()) -> RoundResult:
        """Whatever is still open timed out, and the microbatches the round never fed failed too (a short round
        is a lost one, not a smaller one); the result is final."""
        with self.cv:
            for microbatch in never_started:
                self._result.failed[microbatch] = "never started (round deadline or stop)"
            for key in list(self._open):
                self._result.failed[key[1]] = "timed out"
                self._result.losses.pop(key[1], None)  # a loss counts only with its tokens
                self._labels.pop(key, None)
            self._open.clear()
            self._plan = None
            return self._result

    # ---- hooks the executor calls --------------------------------------------------------------------------
    def labels(self, round_: int, microbatch: int) -> torch.Tensor | None:
        with self.cv:
            return self._labels.get((round_, microbatch))

    def on_loss(self, round_: int, microbatch: int, loss: float, logits: torch.Tensor) -> None:
        with self.cv:
            if (round_, microbatch) in self._open:
                self._result.losses[microbatch] = loss
                if self._keep_logits:
                    self._result.logits[microbatch] = logits.detach()

    def on_done(self, round_: int, microbatch: int) -> None:
        self.close(round_, microbatch, None)

    def on_failed(self, round_: int, microbatch: int, reason: str) -> None:
        self.close(round_, microbatch, reason)

    def close(self, round_: int, microbatch: int, failure: str | None) -> None:
        with self.cv:
            if (round_, microbatch) not in self._open:
                return
            self._open.discard((round_, microbatch))
            self._labels.pop((round_, microbatch), None)
            if failure is None:
                self._result.tokens += self.tokens_per_microbatch
            else:
                self._result.failed[microbatch] = failure
                self._result.losses.pop(microbatch, None)
            self.cv.notify_all()

    # ---- what re-routing reads and changes (node/faults/faults.py) -----------------------------------------
    def is_current(self, report: pb.FailureReport) -> bool:
        """The report is about an open microbatch's current attempt (not one already replaced)."""
        with self.cv:
            return ((report.round, report.microbatch) in self._open
                    and report.attempt == self._attempts.get(report.microbatch, 0))

    def failed(self, report: pb.FailureReport) -> Failed | None:
        """Note the failed peer as one to avoid this round; the microbatch's state, if it is still current."""
        with self.cv:
            if report.failed_peer:  # dead, hung or refusing: not for this round
                self._avoid.add(report.failed_peer)
            key = (report.round, report.microbatch)
            if key not in self._open or self._plan is None or report.attempt != self._attempts.get(key[1], 0):
                return None
            return Failed(self._plan, report.attempt, self._labels[key], frozenset(self._avoid))

    def on_path(self, round_: int, microbatch: int, peer: str) -> bool | None:
        """Whether `peer` is on a path one of our microbatch's attempts took; None for a microbatch we do not know
        (another origin's, or from a round before the last)."""
        with self.cv:
            peers = self._paths.get((round_, microbatch))
            return None if peers is None else peer in peers

    def adopt(self, round_: int, microbatch: int, attempt: int, path: Sequence[HopSpec]) -> bool:
        """`attempt`, along `path`, is now the microbatch's current one; False when it closed meanwhile."""
        with self.cv:
            if (round_, microbatch) not in self._open:
                return False
            self._attempts[microbatch] = attempt
            self._paths.setdefault((round_, microbatch), set()).update(h.peer_id for h in path)
            self._result.reroutes += 1
            return True


class Origin:
    def __init__(self, swarm: str, executor: StageExecutor, book: OriginBook, data: TokenStream, batch_size: int,
                 seq_len: int, max_inflight: int, seed: int, memory_retry_s: float):
        self.swarm = swarm
        self.executor = executor
        self.book = book
        self.data = data
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.max_inflight = max_inflight
        self.seed = seed
        self.memory_retry_s = memory_retry_s  # how often a full activation memory is tried again

    def sample(self, round_: int, microbatch: int) -> torch.Tensor:
        """Deterministic in (seed, round, microbatch): a re-sent microbatch carries the same tokens."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + round_) * 1_000_003 + microbatch)
        return self.data.sample(gen, self.batch_size, self.seq_len)

    def start(self, env: pb.Envelope, input_ids: torch.Tensor) -> None:
        """Hop 0 of a microbatch (or of its new attempt), once our own activation memory has room."""
        while not self.executor.start_microbatch(env, input_ids):
            if time.monotonic() > self.book.deadline or self.book.stop.wait(self.memory_retry_s):
                return

    def run_round(self, round_: int, microbatches: list[PlannedMicrobatch], deadline: float,
                  stop: threading.Event, inputs: dict[int, torch.Tensor] | None = None,
                  plan: RoundPlan | None = None, keep_logits: bool = False) -> RoundResult:
        """Feed this node's microbatches of the round and wait for them; `inputs` overrides sampling.
        With the round's `plan`, failed microbatches can be re-routed; `keep_logits` keeps them in the result."""
        book = self.book
        book.open_round(plan, deadline, stop, keep_logits)
        started = 0
        for mb in microbatches:
            ids = inputs[mb.id] if inputs is not None else self.sample(round_, mb.id)
            with book.cv:
                if not book.cv.wait_for(lambda: book.in_flight() < self.max_inflight or stop.is_set(),
                                        max(0.0, deadline - time.monotonic())) or stop.is_set():
                    break
                book.add(round_, mb.id, ids, mb.path)
            self.start(make_envelope(self.swarm, round_, mb.id, mb.path, hop=0), ids)
            started += 1
        with book.cv:
            book.cv.wait_for(lambda: not book.in_flight() or stop.is_set(), max(0.0, deadline - time.monotonic()))
        return book.close_round(never_started=[mb.id for mb in microbatches[started:]])

    def interrupt(self) -> None:
        """Wake `run_round`'s waits (the node is stopping; they re-check their stop event)."""
        with self.book.cv:
            self.book.cv.notify_all()
