"""The fault component: every part of a node's failure handling, built in one place.

Detection (`HopWatch`, a send `HopSender` gave up on, the planner's liveness pings), the declared-dead set,
reports to origins, re-route notices, and, on a data node, re-routing its own failed microbatches. Each
collaborator is passed to a constructor here; nothing is attached afterwards.

One failure's path: a hop fails (detected here) → `FailureReporter` sends the report to the microbatch's
origin (or, when that is us, calls `on_failure_report` directly) → the origin's `Faults` finds a new path
(`PathRepair`), tells the round's nodes (`RerouteNotifier`, our own executor included) and restarts the
microbatch from hop 0 with the next attempt number.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from node.config import FaultConfig
from node.dataplane.transport import StageClients
from node.faults.bans import Bans
from node.faults.detection import CHECKED, DEADLINE, DeadPeers, FailureReporter, HopWatch, RerouteNotifier
from node.faults.reroute import PathRepair
from node.host.metrics import NodeMetrics
from node.stage.executor import StageExecutor
from node.stage.origin import OriginBook
from protocol.envelope import HopSpec, make_envelope
from protocol.errors import ProtocolError
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.notice_auth import NoticeSigner
from protocol.records import NodeRecord, RoundPlan

log = logging.getLogger(__name__)

Restart = Callable[[pb.Envelope, torch.Tensor], None]  # start a microbatch's new attempt at hop 0


class Faults:
    def __init__(self, settings: FaultConfig, swarm: str, peer_id: str, clients: StageClients, signer: NoticeSigner,
                 metrics: NodeMetrics,
                 executor: StageExecutor, activation_bytes: int, members: Callable[[], dict[str, NodeRecord]],
                 join_timeout: float, emit: Callable[..., None], book: OriginBook | None = None,
                 restart: Restart | None = None):
        """`emit`: the node's event log. `book` and `restart` are a data node's: its open microbatches, and how
        to send one again."""
        s = settings
        self.settings = settings
        self.swarm = swarm
        self.peer_id = peer_id
        self.clients = clients
        self.metrics = metrics
        self.executor = executor
        self.members = members  # the swarm's records, for compute times when re-routing
        self.book = book
        self.restart = restart
        self.dead = DeadPeers(metrics, on_declared=self._declared)
        self.bans = Bans(s.ban_rounds, s.ban_after_refusals, s.ban_window, emit)
        metrics.banned_peers.set_function(lambda: len(self.bans.banned(executor.round)))
        self.reporter = FailureReporter(swarm, peer_id, clients, signer, metrics, self.dead,
                                        local=self.on_failure_report, timeout_s=s.notice_timeout,
                                        workers=s.report_workers, move_wait_s=s.relay_move_wait)
        self.notifier = RerouteNotifier(peer_id, clients, signer, executor, s.notice_timeout,
                                        workers=s.notice_workers, tries=s.notice_tries, move_wait_s=s.relay_move_wait)
        self.watch = HopWatch(peer_id, executor, clients, self.reporter, self.dead, interval_s=s.hop_watch_interval,
                              probe_timeout_s=s.probe_timeout, hung_after_misses=s.hung_after_misses,
                              join_timeout_s=join_timeout)
        self.paths = PathRepair(activation_bytes)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reroute")  # one re-route at a time

    def start(self) -> None:
        self.watch.start()

    def close(self) -> None:
        self.watch.stop()
        self.reporter.close()
        self.notifier.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- detection -------------------------------------------------------------------------------------------
    def send_failed(self, env: pb.Envelope, code: grpc.StatusCode | None, detail: str) -> None:
        """`HopSender` gave up on delivering `env` (addressed to the hop that failed)."""
        self.reporter.send_failed(env, code, detail)

    def hop_refused(self, env: pb.Envelope, sender: str, kind: str, detail: str) -> None:
        """A hop `sender` sent us failed our hop checks (`kind`): report the sender to the microbatch's origin."""
        self.metrics.hops_refused.labels(reason=kind).inc()
        self.reporter.report(env, sender, CHECKED, detail)

    def alive(self, members: dict[str, NodeRecord]) -> dict[str, NodeRecord]:
        """Members that answer a Ping now (a node that died keeps its DHT record until it expires): the others
        are declared dead, and one that answers again is forgiven (restarted with the same identity)."""
        others = {p: r.endpoint for p, r in members.items() if p != self.peer_id}
        answering = self.clients.answering(others, self.settings.probe_timeout, self.settings.ping_workers)
        for peer in others:
            if peer in answering:
                self.dead.forgive(peer)
            else:
                self.dead.declare(peer, "no answer to the planner's ping")
        return {p: r for p, r in members.items() if p == self.peer_id or p in answering}

    def _declared(self, peer: str) -> None:
        """A dead origin will re-route nothing more: the round need not stay open for it."""
        self.executor.origin_done(self.executor.round, peer)

    # ---- the end of our own round ----------------------------------------------------------------------------
    def round_done(self, plan: RoundPlan) -> None:
        """Our microbatches of the round are all finished: nobody needs to keep the round open for us."""
        dead = self.dead.snapshot()
        notice = pb.RoundDoneNotice(swarm_id=self.swarm, round=plan.round, origin=self.peer_id)
        self.notifier.round_done({p: e for p, e in plan.endpoints().items() if p not in dead}, notice)

    # ---- re-routing our own microbatches (data nodes) --------------------------------------------------------
    def on_failure_report(self, report: pb.FailureReport, sender: str) -> None:
        """A hop of one of our microbatches failed, says `sender` (we, or a peer that signed the report): re-route
        it, off this thread. PERMISSION_DENIED, changing nothing, when the sender is on none of its paths."""
        if self.book is None:
            return
        if sender != self.peer_id:
            on_path = self.book.on_path(report.round, report.microbatch, sender)
            if on_path is None:  # not a microbatch of ours we still track: nothing to re-route
                return
            if not on_path:
                raise ProtocolError(grpc.StatusCode.PERMISSION_DENIED,
                                    f"{sender[-8:]} is on no path of round {report.round} microbatch "
                                    f"{report.microbatch}: only its nodes report its failures")
        if report.reason.startswith(CHECKED + ":"):
            report = self._accuse(report, sender)
        if self.book.is_current(report):
            self._pool.submit(self._reroute, report)

    def _accuse(self, report: pb.FailureReport, accuser: str) -> pb.FailureReport:
        """A receiver on the microbatch's path says a hop `report.failed_peer` sent it failed its checks: ban
        that peer. An accusation of ourselves we know to be false, but not malicious (after an outer step honest
        activations jump past a band): no ban, and the accuser is the peer the microbatch's new path avoids."""
        if report.failed_peer == accuser or not self.book.on_path(report.round, report.microbatch,
                                                                   report.failed_peer):
            raise ProtocolError(grpc.StatusCode.PERMISSION_DENIED,
                                f"{report.failed_peer[-8:]} is on no path of round {report.round} microbatch "
                                f"{report.microbatch} beside {accuser[-8:]}: no hop of theirs to accuse")
        self.metrics.accusations.inc()
        if report.failed_peer != self.peer_id:
            self.bans.refused(report.failed_peer, report.round, report.reason, accuser)
            return report
        log.info("%s refused our own hop of round %d microbatch %d: %s", accuser[-8:], report.round,
                 report.microbatch, report.reason)
        refused = pb.FailureReport()
        refused.CopyFrom(report)
        refused.failed_peer = accuser
        return refused

    def _reroute(self, report: pb.FailureReport) -> None:
        failed = self.book.failed(report)
        if failed is None:
            return
        round_, mb, attempt = report.round, report.microbatch, report.attempt + 1
        avoid = self.dead.snapshot() | failed.avoid | self.bans.banned(round_)
        told = self._told(round_, report)
        if attempt > self.settings.max_attempts:
            self._abandon(failed.plan, round_, mb, attempt, avoid, told,
                          f"gave up after {report.attempt + 1} attempts: {report.reason}")
            return
        path = self.paths.path_for(failed.plan, mb, frozenset(avoid), self.members())
        if path is None and report.reason.startswith(DEADLINE) and report.failed_peer not in self.dead:
            # Slow, not gone, and nothing else can take the hop: waiting for it beats losing the microbatch.
            # Should the peer die after all, the hop watch reports that too, and the round's deadline stands.
            log.info("round %d microbatch %d: no other path than through the slow %s; waiting for it", round_, mb,
                     report.failed_peer[-8:])
            return
        if path is None:
            log.warning("round %d microbatch %d: no live path avoids %s; it is lost (%s)", round_, mb,
                        ", ".join(sorted(p[-8:] for p in avoid)), report.reason)
            self._abandon(failed.plan, round_, mb, attempt, avoid, told,
                          f"no live path: {report.reason}")
            return
        if not self.book.adopt(round_, mb, attempt, path):
            return
        notice = pb.RerouteNotice(swarm_id=self.swarm, round=round_, microbatch=mb, attempt=attempt,
                                  path=[h.to_pb() for h in path])
        peers = {**failed.plan.endpoints(), **{h.peer_id: h.endpoint for h in path}}
        self.notifier({p: e for p, e in peers.items() if p not in avoid or p in told}, notice)
        self.metrics.reroutes.inc()
        log.info("round %d microbatch %d: re-routed as attempt %d via %s (%s)", round_, mb, attempt,
                 _describe(path), report.reason)
        self.restart(make_envelope(self.swarm, round_, mb, path, hop=0, attempt=attempt), failed.input_ids)

    def _told(self, round_: int, report: pb.FailureReport) -> frozenset[str]:
        """Peers to avoid that still get re-route notices: banned ones, and the sender of a hop that failed its
        checks, answer, and the notice frees the hop they hold (else they wait for a gradient that will not
        come until their round's deadline)."""
        accused = {report.failed_peer} if report.reason.startswith(CHECKED + ":") else set()
        return (self.bans.banned(round_) | accused) - self.dead.snapshot()

    def _abandon(self, plan: RoundPlan, round_: int, mb: int, attempt: int, avoid, told: frozenset[str],
                 reason: str) -> None:
        """Give a microbatch up: a notice with an empty path tells the round's nodes (us included) to stop
        waiting for its hops and free what they kept, so the round does not wait out its deadline."""
        notice = pb.RerouteNotice(swarm_id=self.swarm, round=round_, microbatch=mb, attempt=attempt)
        self.notifier({p: e for p, e in plan.endpoints().items() if p not in avoid or p in told}, notice)
        self.book.on_failed(round_, mb, reason)


def _describe(path: tuple[HopSpec, ...]) -> str:
    return " -> ".join(f"{h.stage}@{h.peer_id[-6:]}" for h in path)
