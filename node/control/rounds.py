"""The round loop: agree on a plan, run it, average gradients across replicas, step.

Round r's plan is published in the DHT by the round's planner (the serving data node with the lowest
peer id). Every node fetches the same plan and acts on it, so all nodes agree on round numbers and paths.

A plan predicts the whole round: the simulator's iteration, the sync its replica groups add
(`routing.sync_cost` over the measured links), and the round's overhead. The overhead is measured: each
round's time beyond the plan's work and the sync (waiting for and fetching the plan, publishing it, the
optimizer steps, the digest check, checkpoints), EWMA-smoothed (--overhead-smoothing) over the rounds this
node ran back to back; the planner predicts with its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from hivemind.utils import get_dht_time

from node.config import NodeConfig
from node.sync.agreement import agree_sync, reference_replica
from node.sync.averaging import Contribution, GradientExchange
from node.sync.outer_sync import OuterSync, is_sync_round
from node.control.checkpoint import StageCheckpoints
from node.dataplane.codec_agreement import agree, hop_bytes
from node.control.discovery import SwarmDirectory
from node.events import EventLog
from node.stage.executor import StageExecutor
from node.faults import misbehave
from node.faults.faults import Faults
from node.host.metrics import NodeMetrics
from node.host.reachability import NOT_CHECKED, Reachability
from node.stage.origin import Origin
from node.control.links import LinkBook
from node.control.planning import (choose_planner, missing_stages, plan_around_missing, plan_round, predict_sync,
                                   without_banned)
from node.faults.reroute import expected_round_seconds
from node.smoothing import ewma
from node.stage.trainer import StageTrainer
from node.dataplane.transport import StageClients
from protocol.records import NodeRecord, RoundPlan
from protocol.service import SYNC
from protocol.sync_names import OUTER, SYNC_NAMES
from routing.instance_io import problem_to_dict
from routing.sync_cost import whole_round_seconds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Synced:
    """One stage's sync in one round."""

    grad_norm: float | None  # before clipping; None when the stage took no step
    peers: int  # replicas averaged with, this one included
    bytes: int  # received from the other replicas, counted from the frames
    seconds: float  # from the sync's start to its end (under outer: overlapped with the next round's compute)
    waited: float  # what the sync added to this round: all of it, or under outer the wait for the group
    synced_round: int | None = None  # the round whose sync this round applied (every round but under outer)


@dataclass(frozen=True)
class StageSync:
    """What `status` shows of a stage's sync (node/roles/stage.py puts it in the node's record)."""

    strategy: str
    last_round: int  # the round whose sync was last applied
    bytes: int  # received by that sync
    seconds: float
    drift: float  # under outer: ||weights - anchor|| / ||anchor|| when the last sync began


class RoundLoop:
    def __init__(self, config: NodeConfig, peer_id: str, directory: SwarmDirectory, executor: StageExecutor,
                 trainers: dict[int, StageTrainer], exchange: GradientExchange, outer: OuterSync,
                 origin: Origin | None,
                 clients: StageClients, metrics: NodeMetrics, events: EventLog, faults: Faults, links: LinkBook,
                 checkpoints: StageCheckpoints | None,
                 activation_shape: tuple[int, int, int], activation_bytes: int, gradient_bytes: list[int],
                 on_plan: Callable[[RoundPlan], None], left_out_limit: int | None = None,
                 reachability: Callable[[], Reachability] = lambda: NOT_CHECKED):
        """`activation_shape` is [batch, seq, hidden] (the planner prices hops by their encoded size);
        `gradient_bytes` is each stage's float32 gradient size (the planner prices the sync with it);
        `on_plan` is told each round's plan once fetched (admission checks hops and re-routes against it);
        `left_out_limit`: end the loop after this many rounds in a row without this node (node/roles/choice.py);
        `reachability`: what the host's last reachability check found (a node that cannot receive hops is left
        out of plans, and says why)."""
        self.config = config
        self.peer_id = peer_id
        self.directory = directory
        self.executor = executor
        self.trainers = trainers
        self.exchange = exchange
        self.outer = outer  # the outer loop's syncs in flight (--sync outer)
        self.origin = origin
        self.clients = clients
        self.metrics = metrics
        self.events = events
        self.faults = faults
        self.links = links  # measured links: planners read them, every node refreshes its own
        self.checkpoints = checkpoints  # --checkpoint-dir, saved every --checkpoint-every rounds
        self.activation_shape = activation_shape
        self.activation_bytes = activation_bytes
        self.gradient_bytes = gradient_bytes
        self.left_out_limit = left_out_limit
        self.on_plan = on_plan
        self.reachability = reachability
        self._stale = False  # rounds went by without a step or a copy here: copy before working again
        self._said_left_out = False  # the WARNING is said once per stretch of rounds without work
        self.visits = config.rounds.visits or config.model.num_stages  # stages per microbatch path; all of them by default
        self._warned_missing: tuple[int, ...] = ()
        self._stages_seen: set[int] = set()  # stages some plan used: only those can be lost (and skipped)
        self._members: dict[str, NodeRecord] = {}  # the membership last read while waiting for a plan
        self._last_executed = 0.0  # seconds the last round's work took here: a floor for hop deadlines
        self._sync: dict[int, StageSync] = {}  # by stage: the last sync applied
        self._drift: dict[int, float] = {}  # by stage, under outer: the drift when its last sync began
        self._overhead_s: float | None = None  # smoothed round time beyond work and sync (module docstring)

    def run(self, first_round: int, stop: threading.Event) -> bool:
        """Take part in rounds until stopped or --rounds is reached; True when it ended because the plans left
        this node out `left_out_limit` times in a row."""
        round_, left_out = first_round, 0
        ended = None  # when the round before this one ended here, if this node ran it
        while not stop.is_set() and (not self.config.training.rounds or round_ < self.config.training.rounds):
            plan = self._await_plan(round_, stop)
            if plan is None:
                return False
            if self.peer_id in plan.participants() and self._seconds_left(plan) > 0:
                if self._stale:  # planned again after idle rounds: take the state the round starts from
                    self._refresh(plan, stop)
                    ended = None
                ended = self._run_round(plan, stop, ended)
                left_out, self._said_left_out = 0, False
            else:  # left out, or too late to take part
                ended = None
                left_out += 1
                self._left_out(plan, left_out, stop)
                if self.left_out_limit is not None and left_out >= self.left_out_limit:
                    log.info("left out of %d plans in a row", left_out)
                    return True
            round_ += 1
        return False

    @staticmethod
    def _seconds_left(plan: RoundPlan) -> float:
        return plan.deadline - get_dht_time()

    # ---- planning ----------------------------------------------------------------------------------------------
    def _await_plan(self, round_: int, stop: threading.Event) -> RoundPlan | None:
        self.metrics.phase.state("planning")
        waited = time.monotonic()
        while not stop.is_set():
            plan = self.directory.fetch_plan(round_)
            if plan is not None:
                self._stages_seen.update(h.stage for mb in plan.microbatches for h in mb.path)
                self.on_plan(plan)
                return plan
            members = self.directory.members()
            self._members = members
            if choose_planner(members) == self.peer_id:
                # Members that say they cannot receive hops are not pinged: a ping would only wait out its timeout.
                candidates = {p: r for p, r in members.items() if r.reach.receives_hops}
                plan = self._make_plan(self.faults.alive(candidates), round_)
                if plan is not None:
                    self.directory.publish_plan(plan, ttl=self.config.rounds.plan_ttl())
                    continue
            if time.monotonic() - waited > self.config.rounds.plan_wait_log:
                log.info("waiting for round %d's plan (a data node and every stage must be up)", round_)
                waited = time.monotonic()
            stop.wait(self.config.rounds.plan_poll)
        return None

    def _make_plan(self, alive: dict[str, NodeRecord], round_: int) -> RoundPlan | None:
        deadline = get_dht_time() + self.config.rounds.round_timeout
        members = without_banned(alive, self.faults.bans.banned(round_), self.config.model.num_stages)
        missing = missing_stages(members, self.config.model.num_stages)
        if set(missing) - self._stages_seen:
            return None  # a new swarm waits until every stage has joined once
        self._say_missing(missing, round_)
        links = self.links.known()
        codecs = agree(members)  # one codec per direction for the round; a hop costs the bytes it puts on the wire
        activation_bytes = hop_bytes(codecs[0], self.activation_shape, self.activation_bytes)

        def plan_for(nodes: dict[str, NodeRecord], num_stages: int, visits: int):
            return plan_round(nodes, links, round_=round_, num_stages=num_stages, visits=visits,
                              microbatches_per_origin=self.config.rounds.microbatches, activation_bytes=activation_bytes,
                              planner=self.peer_id, deadline=deadline)

        try:
            if sum(r.plannable for r in alive.values()) < self.config.swarm.min_nodes:
                return None
            if missing and self.visits < self.config.model.num_stages:  # skip plans go on around lost stages
                made = plan_around_missing(plan_for, members, self.config.model.num_stages, self.visits, missing)
            else:
                made = plan_for(members, self.config.model.num_stages, self.visits)
        except ValueError as e:  # e.g. replica counts that cannot balance yet: wait for the swarm to change
            log.warning("%s", e)
            return None
        if made is None:
            return None
        plan, live = made
        sync, sync_every = agree_sync(members)
        plan = replace(plan, codecs=codecs, sync=sync, sync_every=sync_every)
        sync_s = predict_sync(plan, links, self.gradient_bytes, self.config.sync.codec)
        overhead_s = self._overhead_s or 0.0  # none measured before this node has run two rounds back to back
        if plan.predicted_s > 0:  # an origin-only plan (one stage) predicts no iteration, so no round either
            plan = replace(plan, predicted_round_s=whole_round_seconds(plan.predicted_s, sync_s, overhead_s))
        self.events.emit("planned", round=round_, predicted_s=plan.predicted_s,
                         predicted_round_s=plan.predicted_round_s, predicted_sync_s=sync_s, overhead_s=overhead_s,
                         defaulted_links=live.defaulted_links if live else 0, activation_bytes=activation_bytes,
                         skipped_link_values=self.links.skipped,
                         problem=problem_to_dict(live.problem) if live else None)
        return plan

    def _say_missing(self, missing: list[int], round_: int) -> None:
        """One WARNING each time the set of stages without a live replica changes."""
        if tuple(missing) == self._warned_missing:
            return
        self._warned_missing = tuple(missing)
        self.metrics.missing_stages.set(len(missing))
        if not missing:
            log.info("round %d: every stage has a live replica again", round_)
        elif self.visits >= self.config.model.num_stages:
            log.warning("round %d: stage %s has no live replica; the swarm waits for a node to host it",
                        round_, ", ".join(map(str, missing)))
        else:
            log.warning("round %d: stage %s has no live replica; training continues on paths that skip it",
                        round_, ", ".join(map(str, missing)))
        self.events.emit("missing_stages", round=round_, stages=missing)

    # ---- one round ---------------------------------------------------------------------------------------------
    def _run_round(self, plan: RoundPlan, stop: threading.Event, previous_end: float | None) -> float | None:
        """Run `plan`; returns when the round ended (None when it was abandoned). `previous_end` is when this
        node's previous round ended, if it ran that one: the round then counts from there, the plan's wait
        included."""
        self.metrics.phase.state("compute")
        started = time.monotonic()
        deadline = started + self._seconds_left(plan)  # the same instant on every node of the round
        work = plan.work_of(self.peer_id)
        self.clients.codecs.use(plan.round, plan.codecs)
        dead = self.faults.dead.snapshot()
        origins = {mb.origin for mb in plan.microbatches} - dead
        self.executor.begin_round(plan.round, {(mb, hop) for mb, hop, _ in work}, origins)
        # Hop deadlines come from the plan's expected time, not the round timeout (with the members last read
        # while planning: a hung DHT must not hold the round here), and from the last round's measured time: a
        # prediction from links not yet measured can be far too low.
        expected = max(plan.predicted_s, expected_round_seconds(plan, self._members), self._last_executed)
        faults = self.config.faults
        self.faults.watch.set_hop_deadline(max(faults.hop_deadline_min, faults.hop_deadline_slack * expected))
        result = None
        if self.origin is not None:
            mine = [mb for mb in plan.microbatches if mb.origin == self.peer_id]
            result = self.origin.run_round(plan.round, mine, deadline, stop, plan=plan)
            self.faults.round_done(plan)  # nobody needs to keep the round open for our microbatches
        complete = self.executor.wait_round(max(0.0, deadline - time.monotonic()), stop)
        executed = time.monotonic() - started  # the plan's work, what the simulator predicts (no averaging)
        self._last_executed = executed
        counts = self.executor.end_round(plan.round)
        if stop.is_set():
            log.info("stopping: round %d abandoned", plan.round)
            self.metrics.rounds_aborted.inc()
            return None
        if not complete:
            log.warning("round %d timed out; stepping with the microbatches that finished", plan.round)
        synced: dict[int, Synced] = {}
        # Replicas finish their work at about the same time. A dead one fails its pull at once; a live one
        # that is slower is waited for a grace period (never past the round's deadline plus a little).
        finished = time.monotonic()
        grace = max(self.config.rounds.averaging_grace_min, finished - started)
        pull_until = min(finished + grace,
                         deadline + min(self.config.rounds.averaging_overrun_max, self.config.rounds.round_timeout / 2))
        self.metrics.phase.state("averaging")
        for name in SYNC_NAMES:
            self.metrics.sync_strategy.labels(strategy=name).set(int(name == plan.sync))
        for stage in self.trainers:
            if plan.sync == OUTER:
                synced[stage] = self._step_and_sync(plan, stage, counts.get(stage, 0), pull_until, stop)
            else:
                synced[stage] = self._reduce_and_step(plan, stage, counts.get(stage, 0), pull_until, stop)
            self._record_sync(plan, stage, synced[stage])
        # Under outer, this round's sync is still in flight: the others may pull it during the next round.
        self.exchange.passed(plan.round - 1 if plan.sync == OUTER else plan.round)
        (self.metrics.rounds_completed if complete and not stop.is_set() else self.metrics.rounds_aborted).inc()
        if stop.is_set():  # averaging was cut short: the process is about to exit
            return None
        self._checkpoint(plan.round)
        ended = time.monotonic()
        wall = ended - started
        # The whole round, from the previous round's end (the plan's wait included) when this node ran that one.
        round_s = wall if previous_end is None else ended - previous_end
        if previous_end is not None:
            beyond = max(0.0, round_s - executed - sum(x.waited for x in synced.values()))
            self._overhead_s = ewma(self._overhead_s, beyond, self.config.rounds.overhead_smoothing)
        self.metrics.round_seconds.observe(wall)
        self.links.after_round(plan, {p: r.endpoint for p, r in self.directory.members().items()})
        fields = dict(round=plan.round, wall_s=round(wall, 3), counts=counts,
                      averaged_with={s: x.peers for s, x in synced.items()},
                      executed_s=round(executed, 3), predicted_s=plan.predicted_s, round_s=round(round_s, 3),
                      predicted_round_s=plan.predicted_round_s,
                      stage_visits=_stage_visits(plan, self.config.model.num_stages),
                      digests={s: t.digest() for s, t in self.trainers.items()},
                      anchors={s: t.anchor_digest() for s, t in self.trainers.items()},
                      synced_rounds={s: x.synced_round for s, x in synced.items()},
                      grad_norms={s: x.grad_norm for s, x in synced.items()}, codecs=list(plan.codecs),
                      sync=plan.sync, sync_bytes={s: x.bytes for s, x in synced.items()},
                      sync_s={s: round(x.seconds, 3) for s, x in synced.items()},
                      sync_wait_s={s: round(x.waited, 3) for s, x in synced.items()},
                      cpu_s=round(time.process_time(), 3))  # this process's CPU so far: contention shows per round
        if self._warned_missing:
            fields.update(missing_stages=list(self._warned_missing))
        if result is not None:
            fields.update(loss=result.mean_loss, tokens=result.tokens, failed=len(result.failed),
                          reroutes=result.reroutes, plan=plan.to_value())
            self.metrics.set_loss(result.mean_loss if result.tokens else None)
            self.metrics.tokens.inc(result.tokens)
            log.info("round %d: loss %s, %d tokens, %.2fs", plan.round,
                     f"{result.mean_loss:.4f}" if result.mean_loss is not None else "n/a", result.tokens, wall)
        self.events.emit("round", **fields)
        return ended

    def _reduce_and_step(self, plan: RoundPlan, stage: int, count: int, pull_until: float,
                         stop: threading.Event) -> Synced:
        """Average this stage's gradients with its replicas in the plan, weighted by microbatches, then step.

        Each replica also shares the digest of the weights it computed with. A replica whose weights
        differ from the most common digest copies the state of a replica holding it after the step,
        so drift between replicas (a missed averaging, a late joiner) heals within a round.
        """
        trainer = self.trainers[stage]
        self.outer.abandon(stage, trainer)  # if the plan left outer with a sync in flight: its replicas moved on
        dead = self.faults.dead.snapshot()
        members = plan.endpoints(stage)
        replicas = {p: e for p, e in members.items() if p not in dead or p == self.peer_id}
        mine = Contribution(misbehave.posted(self.config.faults.misbehaving(plan.round), trainer.grads()), count,
                            trainer.digest())
        received, started = self.metrics.bytes_so_far("received", SYNC), time.monotonic()
        averaged = self.exchange.average(stage, plan.round, trainer.names, mine, replicas, pull_until,
                                         stop, strategy=plan.sync)
        sync_bytes, sync_s = self.metrics.bytes_so_far("received", SYNC) - received, time.monotonic() - started
        if len(averaged.peers) < len(members):
            self.metrics.averaging_failures.inc()
            log.warning("stage %d round %d: averaged with %d of the plan's %d replicas", stage, plan.round,
                        len(averaged.peers), len(members))
        peers = len(averaged.peers)
        reference = reference_replica(averaged.peers, trainer.digest()) if peers > 1 else None
        if averaged.total == 0:
            trainer.skip(plan.round)
            norm = None
        else:
            trainer.set_grads(averaged.grads)
            norm = trainer.step(plan.round)
        if reference is not None:
            log.warning("stage %d weights differ from replica %s's; copying its state", stage, reference[-8:])
            self._copy_state(stage, plan.round, [reference])
        return Synced(norm, peers, sync_bytes, sync_s, sync_s, synced_round=plan.round)

    def _step_and_sync(self, plan: RoundPlan, stage: int, count: int, pull_until: float,
                       stop: threading.Event) -> Synced:
        """Under `outer` (node/sync/outer.py): step on this replica's own gradients; apply the sync that began
        after the last round, if any; after a sync round, begin the next sync in the background."""
        trainer = self.trainers[stage]
        trainer.start_outer()
        norm = None
        # The round is not over for this stage until its sync is applied and the next begun: a replica copying the
        # state after it (FetchState's min_round) gets it whole.
        if count:
            trainer.set_grads([g / count for g in trainer.grads()])  # our mean over our microbatches
            norm = trainer.step(plan.round, complete=False)
        else:
            trainer.skip(plan.round, complete=False)
        applied = self.outer.finish(stage, trainer, pull_until, stop)
        synced = Synced(norm, 1, 0, 0.0, 0.0)
        if applied is not None:
            synced = Synced(norm, len(applied.peers), applied.bytes, applied.seconds, applied.waited,
                            synced_round=applied.round)
            if applied.reference is not None:
                log.warning("stage %d anchor differs from replica %s's; copying its state", stage,
                            applied.reference[-8:])
                self._copy_state(stage, plan.round, [applied.reference])
        elif (missed := trainer.missed_sync()) is not None and missed[0] < plan.round and not stop.is_set():
            self._catch_up_sync(plan, stage, *missed)
        if is_sync_round(plan.round, plan.sync_every) and not stop.is_set():
            self._drift[stage] = trainer.drift()
            self.metrics.replica_drift.labels(stage=str(stage)).set(self._drift[stage])
            dead = self.faults.dead.snapshot()
            replicas = {p: e for p, e in plan.endpoints(stage).items() if p not in dead or p == self.peer_id}
            # It has the next round to finish in, and the round timeout at most: a dead replica fails at once.
            self.outer.start(stage, plan.round, trainer, replicas,
                             time.monotonic() + self.config.rounds.round_timeout, stop)
        trainer.complete(plan.round)
        return synced

    def _catch_up_sync(self, plan: RoundPlan, stage: int, missed: int, donor: str | None) -> None:
        """This stage's weights were copied from a replica (or its checkpoint) while the sync of round `missed`
        was in flight there: they lack it, and the replicas that applied it have moved their anchor. Copy the
        state after this round again, from the donor first (it applied that sync), so every replica enters the
        next sync with the same anchor."""
        others = sorted(set(plan.endpoints(stage)) - {self.peer_id})
        if not others:  # no replica left to be out of step with: this anchor is the stage's
            self.trainers[stage].forget_missed_sync()
            return
        log.info("stage %d: copied while the sync of round %d was in flight; copying the state after round %d",
                 stage, missed, plan.round)
        order = ([donor] if donor in others else []) + [p for p in others if p != donor]
        self._copy_state(stage, plan.round, order)

    def _record_sync(self, plan: RoundPlan, stage: int, synced: Synced) -> None:
        if synced.synced_round is None:
            return
        self.metrics.sync_bytes.labels(stage=str(stage)).set(synced.bytes)
        self.metrics.sync_seconds.labels(stage=str(stage)).set(synced.seconds)
        self.metrics.last_sync_round.labels(stage=str(stage)).set(synced.synced_round)
        drift = self._drift.get(stage, 0.0) if plan.sync == OUTER else 0.0
        self._sync[stage] = StageSync(plan.sync, synced.synced_round, synced.bytes, round(synced.seconds, 3),
                                      round(drift, 6))

    def sync_state(self) -> dict[int, StageSync]:
        """The last sync applied, by hosted stage (for the node's record)."""
        return dict(self._sync)

    # ---- a round this node was left out of ----------------------------------------------------------------------
    def _left_out(self, plan: RoundPlan, in_a_row: int, stop: threading.Event) -> None:
        """The first round a node is left out of (a joiner the plan was made before, a missed ping), it copies the
        state after it, as it may well be planned in the next one. Later rounds in a row, and every round while it
        cannot receive hops, it idles: a copy per round would move a stage's weights every round for work it is
        not given. It copies once a plan includes it again (`_refresh`)."""
        reach = self.reachability()
        if reach.reach.receives_hops and in_a_row == 1:
            self._catch_up(plan, stop)
            return
        if not self._said_left_out:
            self._said_left_out = True
            if reach.reach.receives_hops:
                why = "the planner leaves it out although it can receive hops (its ping may not reach this node)"
            else:
                why = f"this node is {reach.reach.value} ({reach.why})"
            log.warning("left out of round %d's plan: %s; it idles without copying state until it is planned",
                        plan.round, why)
            self.events.emit("left_out", round=plan.round, reach=reach.reach.value, reason=why)
        self._idle(plan)
        self._stale = True

    def _idle(self, plan: RoundPlan) -> None:
        """Pass the round without work, step or copy, keeping the round counts aligned."""
        self.metrics.phase.state("catch_up")
        self.executor.begin_round(plan.round, set())
        self.executor.end_round(plan.round)
        self.exchange.passed(plan.round)
        for stage, trainer in self.trainers.items():
            self.outer.abandon(stage, trainer)  # its replicas apply that sync without us; we copy their state when planned
            trainer.skip(plan.round)

    def _refresh(self, plan: RoundPlan, stop: threading.Event) -> None:
        """Planned after idle rounds: copy each stage's state after the previous round from a replica in this
        plan (the replicas do not step this round before they have pulled our gradients or given up on them)."""
        log.info("planned again in round %d after idle rounds: copying the state it starts from", plan.round)
        for stage in self.trainers:
            replicas = sorted(plan.replicas(stage) - {self.peer_id})
            if replicas:
                self._copy_state(stage, plan.round - 1, replicas)
            if stop.is_set():
                return
        self._stale = False

    def _catch_up(self, plan: RoundPlan, stop: threading.Event) -> None:
        """Not in this round's plan (e.g. just joined): copy each stage's state from a replica that is."""
        self.metrics.phase.state("catch_up")
        self.executor.begin_round(plan.round, set())
        self.executor.end_round(plan.round)
        self.exchange.passed(plan.round)
        self._stale = False
        for stage, trainer in self.trainers.items():
            # A sync in flight: the state copied below has it applied, or says it lacks it (`missed_sync`).
            self.outer.abandon(stage, trainer)
            replicas = sorted(plan.replicas(stage) - {self.peer_id})
            if not replicas or not self._copy_state(stage, plan.round, replicas):
                trainer.skip(plan.round)
            if stop.is_set():
                return
        self.events.emit("caught_up", round=plan.round, digests={s: t.digest() for s, t in self.trainers.items()})

    def _copy_state(self, stage: int, round_: int, peers: list[str]) -> bool:
        """Load `stage` as it is after `round_` from the first of `peers` that can provide it."""
        members = self.directory.members()
        for peer in peers:
            if peer not in members:
                continue
            try:
                # the replica may still be finishing the round: it gets the round's time, then the transfer's
                _, tensors, metadata = self.clients.fetch_state(
                    members[peer].endpoint, self.config.swarm.id, stage, min_round=round_, receiver=peer,
                    timeout=self.config.rounds.round_timeout + self.config.lifecycle.state_transfer_timeout)
            except Exception as e:  # try the next replica
                log.warning("fetching stage %d state from %s failed: %r", stage, peer[-8:], e)
                continue
            self.trainers[stage].load(tensors, metadata, source=peer)
            log.info("stage %d: loaded the state after round %d from %s", stage, round_, peer[-8:])
            return True
        return False

    def _checkpoint(self, round_: int) -> None:
        checkpoints = self.checkpoints
        if checkpoints is None or (round_ + 1) % self.config.training.checkpoint_every:
            return
        for stage, trainer in self.trainers.items():
            started = time.perf_counter()
            try:
                path = checkpoints.save(trainer)
            except OSError as e:  # a full disk must not stop training; say so loudly
                log.error("stage %d: checkpoint after round %d failed: %s", stage, round_, e)
                continue
            self.metrics.checkpoint_seconds.observe(time.perf_counter() - started)
            log.debug("stage %d: checkpoint after round %d in %s", stage, round_, path)


def _stage_visits(plan: RoundPlan, num_stages: int) -> list[int]:
    """How many microbatches of the round pass through each stage."""
    visits = [0] * num_stages
    for mb in plan.microbatches:
        for hop in mb.path[:-1]:
            visits[hop.stage] += 1
    return visits
