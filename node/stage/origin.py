"""A data node's origin: it samples microbatches, starts them at hop 0, and collects their losses.

Every microbatch starts and ends here (SkipPipe's stage 0 is never skipped). At most `max_inflight`
microbatches of this node are in the pipeline at once.

When a hop of one of our microbatches fails (`node.faults.detection` reports it here, whichever node saw it),
the origin re-routes the microbatch around the failed peer (`node.faults.reroute`), tells the round's nodes its
new path, and sends it again from hop 0 with the next attempt number.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from lm.data import TokenStream
from node.stage.executor import OriginHooks, StageExecutor
from node.faults.detection import DEADLINE, DeadPeers
from node.host.metrics import NodeMetrics
from node.faults.reroute import Rerouter
from protocol.envelope import HopSpec, make_envelope
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.records import NodeRecord, PlannedMicrobatch, RoundPlan

log = logging.getLogger(__name__)


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


@dataclass
class Recovery:
    """What an origin needs to re-route a failed microbatch."""

    dead: DeadPeers
    rerouter: Rerouter
    members: Callable[[], dict[str, NodeRecord]]  # the swarm's records, for compute times
    notify: Callable[[dict[str, str], pb.RerouteNotice], None]  # peer id -> endpoint
    metrics: NodeMetrics
    max_attempts: int  # re-routes per microbatch before it is given up


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
        self.recovery: Recovery | None = None
        self._plan: RoundPlan | None = None
        self._deadline = 0.0
        self._stop = threading.Event()
        self._attempts: dict[int, int] = {}  # microbatch -> its current attempt
        self._avoid: set[str] = set()  # peers that failed a hop of ours this round
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reroute")
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

    def on_failure_report(self, report: pb.FailureReport) -> None:
        """A hop of one of our microbatches failed (seen here or elsewhere): re-route it, off this thread."""
        with self._cv:
            if (report.round, report.microbatch) not in self._open:
                return
            if report.attempt != self._attempts.get(report.microbatch, 0):
                return  # about an attempt we already replaced
        if self.recovery is None:
            self.on_failed(report.round, report.microbatch, report.reason)
            return
        self._pool.submit(self._reroute, report)

    def _reroute(self, report: pb.FailureReport) -> None:
        rec, mb = self.recovery, report.microbatch
        with self._cv:
            if report.failed_peer:  # dead, hung or refusing: not for this round
                self._avoid.add(report.failed_peer)
            avoid = rec.dead.snapshot() | self._avoid
            plan, key = self._plan, (report.round, mb)
            if key not in self._open or plan is None or report.attempt != self._attempts.get(mb, 0):
                return
            attempt = report.attempt + 1
            ids = self._labels.get(key)
        if attempt > rec.max_attempts:
            self._abandon(plan, report.round, mb, attempt, avoid,
                          f"gave up after {report.attempt + 1} attempts: {report.reason}")
            return
        path = rec.rerouter.path_for(plan, mb, frozenset(avoid), rec.members())
        if path is None and report.reason.startswith(DEADLINE) and report.failed_peer not in rec.dead:
            # Slow, not gone, and nothing else can take the hop: waiting for it beats losing the microbatch.
            # Should the peer die after all, the hop watch reports that too, and the round's deadline stands.
            log.info("round %d microbatch %d: no other path than through the slow %s; waiting for it", report.round,
                     mb, report.failed_peer[-8:])
            return
        if path is None:
            log.warning("round %d microbatch %d: no live path avoids %s; it is lost (%s)", report.round, mb,
                        ", ".join(sorted(p[-8:] for p in avoid)), report.reason)
            self._abandon(plan, report.round, mb, attempt, avoid, f"no live path: {report.reason}")
            return
        with self._cv:
            if key not in self._open:
                return
            self._attempts[mb] = attempt
            self._result.reroutes += 1
        notice = pb.RerouteNotice(swarm_id=self.swarm, round=report.round, microbatch=mb, attempt=attempt,
                                  path=[h.to_pb() for h in path])
        peers = {h.peer_id: h.endpoint for m in plan.microbatches for h in m.path}
        peers.update({h.peer_id: h.endpoint for h in path})
        rec.notify({p: e for p, e in peers.items() if p not in avoid}, notice)
        rec.metrics.reroutes.inc()
        log.info("round %d microbatch %d: re-routed as attempt %d via %s (%s)", report.round, mb, attempt,
                 _describe(path), report.reason)
        self._start(make_envelope(self.swarm, report.round, mb, path, hop=0, attempt=attempt), ids)

    def _abandon(self, plan: RoundPlan, round_: int, mb: int, attempt: int, avoid, reason: str) -> None:
        """Give a microbatch up: a notice with an empty path tells the round's nodes (us included) to stop
        waiting for its hops and free what they kept, so the round does not wait out its deadline."""
        notice = pb.RerouteNotice(swarm_id=self.swarm, round=round_, microbatch=mb, attempt=attempt)
        peers = {h.peer_id: h.endpoint for m in plan.microbatches for h in m.path}
        self.recovery.notify({p: e for p, e in peers.items() if p not in avoid}, notice)
        self.on_failed(round_, mb, reason)

    def _start(self, env: pb.Envelope, ids: torch.Tensor) -> None:
        while not self.executor.start_microbatch(env, ids):  # our own activation memory is full
            if self._stop.is_set() or time.monotonic() > self._deadline:
                return
            time.sleep(0.05)

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
                  stop: threading.Event, inputs: dict[int, torch.Tensor] | None = None,
                  plan: RoundPlan | None = None) -> RoundResult:
        """Feed this node's microbatches of the round and wait for them; `inputs` overrides sampling.
        With the round's `plan`, failed microbatches are re-routed."""
        with self._cv:
            self._result = RoundResult()
            self._plan, self._deadline, self._stop, self._attempts, self._avoid = plan, deadline, stop, {}, set()
        for mb in microbatches:
            ids = inputs[mb.id] if inputs is not None else self.sample(round_, mb.id)
            with self._cv:
                if not self._cv.wait_for(lambda: len(self._open) < self.max_inflight or stop.is_set(),
                                         max(0.0, deadline - time.monotonic())) or stop.is_set():
                    break
                self._labels[(round_, mb.id)] = ids
                self._open.add((round_, mb.id))
            self._start(make_envelope(self.swarm, round_, mb.id, mb.path, hop=0), ids)
        with self._cv:
            self._cv.wait_for(lambda: not self._open or stop.is_set(), max(0.0, deadline - time.monotonic()))
            for key in list(self._open):
                self._result.failed[key[1]] = "timed out"
                self._result.losses.pop(key[1], None)  # a loss counts only with its tokens
                self._labels.pop(key, None)
            self._open.clear()
            self._plan = None
            return self._result

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _describe(path: tuple[HopSpec, ...]) -> str:
    return " -> ".join(f"{h.stage}@{h.peer_id[-6:]}" for h in path)
