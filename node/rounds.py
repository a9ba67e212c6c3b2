"""The round loop: agree on a plan, run it, average gradients across replicas, step.

Round r's plan is published in the DHT by the round's planner (the serving data node with the lowest
peer id). Every node fetches the same plan and acts on it, so all nodes agree on round numbers and paths.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from node.averaging import StageGradientAverager
from node.discovery import SwarmDirectory
from node.events import EventLog
from node.executor import StageExecutor
from node.metrics import NodeMetrics
from node.origin import Origin
from node.planning import choose_planner, full_pipeline_plan
from node.trainer import StageTrainer
from node.transport import StageClients
from protocol.records import RoundPlan

log = logging.getLogger(__name__)


@dataclass
class RoundSettings:
    swarm: str
    num_stages: int
    microbatches: int
    round_timeout: float
    max_rounds: int  # 0: until stopped


class RoundLoop:
    def __init__(self, settings: RoundSettings, peer_id: str, directory: SwarmDirectory, executor: StageExecutor,
                 trainers: dict[int, StageTrainer], averagers: dict[int, StageGradientAverager],
                 origin: Origin | None, clients: StageClients, metrics: NodeMetrics, events: EventLog):
        self.s = settings
        self.peer_id = peer_id
        self.directory = directory
        self.executor = executor
        self.trainers = trainers
        self.averagers = averagers
        self.origin = origin
        self.clients = clients
        self.metrics = metrics
        self.events = events

    def run(self, first_round: int, stop: threading.Event) -> None:
        round_ = first_round
        while not stop.is_set() and (not self.s.max_rounds or round_ < self.s.max_rounds):
            plan = self._await_plan(round_, stop)
            if plan is None:
                return
            if self.peer_id in plan.participants():
                self._run_round(plan, stop)
            else:
                self._catch_up(plan, stop)
            round_ += 1

    # ---- planning ----------------------------------------------------------------------------------------------
    def _await_plan(self, round_: int, stop: threading.Event) -> RoundPlan | None:
        waited = time.monotonic()
        while not stop.is_set():
            plan = self.directory.fetch_plan(round_)
            if plan is not None:
                return plan
            members = self.directory.members()
            if choose_planner(members) == self.peer_id:
                plan = full_pipeline_plan(members, round_, self.s.num_stages, self.s.microbatches, self.peer_id)
                if plan is not None:
                    self.directory.publish_plan(plan, ttl=max(60.0, 4 * self.s.round_timeout))
                    continue
            if time.monotonic() - waited > 30:
                log.info("waiting for round %d's plan (a data node and every stage must be up)", round_)
                waited = time.monotonic()
            stop.wait(0.2)
        return None

    # ---- one round ---------------------------------------------------------------------------------------------
    def _run_round(self, plan: RoundPlan, stop: threading.Event) -> None:
        started = time.monotonic()
        deadline = started + self.s.round_timeout
        work = plan.work_of(self.peer_id)
        self.executor.begin_round(plan.round, {(mb, hop) for mb, hop, _ in work})
        result = None
        if self.origin is not None:
            mine = [mb for mb in plan.microbatches if mb.origin == self.peer_id]
            result = self.origin.run_round(plan.round, mine, deadline, stop)
        complete = self.executor.wait_round(max(0.0, deadline - time.monotonic()), stop)
        counts = self.executor.end_round(plan.round)
        if stop.is_set():
            log.info("stopping: round %d abandoned", plan.round)
            return
        if not complete:
            log.warning("round %d timed out; stepping with the microbatches that finished", plan.round)
        grad_norms, averaged_with = {}, {}
        for stage, trainer in self.trainers.items():
            grad_norms[stage], averaged_with[stage] = self._reduce_and_step(plan, stage, counts.get(stage, 0))
        wall = time.monotonic() - started
        self.metrics.round_seconds.observe(wall)
        fields = dict(round=plan.round, wall_s=round(wall, 3), counts=counts, averaged_with=averaged_with,
                      digests={s: t.digest() for s, t in self.trainers.items()}, grad_norms=grad_norms)
        if result is not None:
            fields.update(loss=result.mean_loss, tokens=result.tokens, failed=len(result.failed))
            if result.mean_loss is not None:
                self.metrics.loss.set(result.mean_loss)
            self.metrics.tokens.inc(result.tokens)
            log.info("round %d: loss %s, %d tokens, %.2fs", plan.round,
                     f"{result.mean_loss:.4f}" if result.mean_loss is not None else "n/a", result.tokens, wall)
        self.events.emit("round", **fields)

    def _reduce_and_step(self, plan: RoundPlan, stage: int, count: int) -> tuple[float | None, int]:
        """Average this stage's gradients with its replicas in the plan, weighted by microbatches, then step."""
        trainer = self.trainers[stage]
        replicas = plan.replicas(stage)
        grads = [g / max(count, 1) for g in trainer.grads()]  # local mean over this replica's microbatches
        peers = 1
        if len(replicas) > 1:
            timeout = self.s.round_timeout
            self.directory.ready_to_average(stage, plan.round, count, ttl=2 * timeout)
            ready = self.directory.wait_ready(stage, plan.round, replicas, timeout=timeout)
            if sum(ready.values()) > 0:
                grads, peers = self.averagers[stage].average(grads, count, group_size=len(ready))
                if peers < len(ready):
                    self.metrics.averaging_failures.inc()
            total = sum(ready.values())
        else:
            total = count
        if total == 0:
            trainer.skip(plan.round)
            return None, peers
        trainer.set_grads(grads)
        return trainer.step(plan.round), peers

    # ---- a round this node was left out of ----------------------------------------------------------------------
    def _catch_up(self, plan: RoundPlan, stop: threading.Event) -> None:
        """Not in this round's plan (e.g. just joined): copy each stage's state from a replica that is."""
        self.executor.begin_round(plan.round, set())
        self.executor.end_round(plan.round)
        for stage, trainer in self.trainers.items():
            replicas = sorted(plan.replicas(stage))
            if not replicas:
                trainer.skip(plan.round)
                continue
            members = self.directory.members()
            for peer in replicas:
                if peer not in members:
                    continue
                try:
                    _, tensors, metadata = self.clients.fetch_state(
                        members[peer].endpoint, self.s.swarm, stage, min_round=plan.round,
                        timeout=self.s.round_timeout * 2)
                except Exception as e:  # try the next replica
                    log.warning("fetching stage %d state from %s failed: %r", stage, peer[-8:], e)
                    continue
                trainer.load(tensors, metadata)
                log.info("stage %d: loaded the state after round %d from %s", stage, plan.round, peer[-8:])
                break
            if stop.is_set():
                return
        self.events.emit("caught_up", round=plan.round, digests={s: t.digest() for s, t in self.trainers.items()})
