"""Failure detection: which peers are gone, which hops failed, and telling each microbatch's origin.

A hop fails in one of two ways, seen by the node just before the failed peer on the path:
- its send fails: the connection is refused or stays down (`HopSender` gives up), or the receiver refuses;
- its gradient does not come back: `HopWatch` pings the next peer of every hop still waiting for its
  backward, and gives up on the hop when the ping fails or when the hop's deadline passes. The deadline
  comes from the round's expected time (`node.faults.reroute.expected_round_seconds`), not from --round-timeout.
Either way a `FailureReport` goes to the microbatch's origin (a local call when that is us), which
re-routes it (`node.faults.faults`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import grpc

from node.stage.executor import StageExecutor
from node.stage.hop_checks import HOP_CHECK
from node.host.metrics import NodeMetrics
from node.dataplane.transport import StageClients
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.notice_auth import NoticeSigner

log = logging.getLogger(__name__)

# failed_hops_total{reason}: unreachable (connection refused or down), hung (pings time out),
# deadline (no gradient back in time), refused (the receiver answered with an error status), checked (a hop
# we received failed our hop checks: reported against its sender, node/stage/hop_checks.py).
UNREACHABLE, HUNG, DEADLINE, REFUSED, CHECKED = "unreachable", "hung", "deadline", "refused", "checked"


class DeadPeers:
    """Peers this node has declared dead. Planning and re-routing avoid them; one that answers again is
    forgiven (a node restarted with the same identity)."""

    def __init__(self, metrics: NodeMetrics, on_declared: Callable[[str], None] = lambda peer: None):
        self.metrics = metrics
        self.on_declared = on_declared  # called with each newly declared peer
        self._dead: dict[str, float] = {}
        self._lock = threading.Lock()

    def declare(self, peer: str, why: str) -> bool:
        """True when this is news."""
        with self._lock:
            if not peer or peer in self._dead:
                return False
            self._dead[peer] = time.monotonic()
        self.metrics.peers_declared_dead.inc()
        log.warning("peer %s declared dead: %s", peer[-8:], why)
        self.on_declared(peer)
        return True

    def forgive(self, peer: str) -> None:
        with self._lock:
            self._dead.pop(peer, None)

    def __contains__(self, peer: str) -> bool:
        with self._lock:
            return peer in self._dead

    def snapshot(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._dead)


class FailureReporter:
    """Sends a failed hop's report to its microbatch's origin, once per (round, microbatch, attempt, kind)."""

    def __init__(self, swarm: str, peer_id: str, clients: StageClients, signer: NoticeSigner, metrics: NodeMetrics,
                 dead: DeadPeers, local: Callable[[pb.FailureReport, str], None], timeout_s: float, workers: int,
                 move_wait_s: float):
        """`local(report, sender)` takes reports about our own microbatches; others go to their origin, signed.
        `move_wait_s`: how long a relayed origin that does not answer may take to announce another relay."""
        self.swarm = swarm
        self.signer = signer
        self.local = local
        self.dead = dead
        self.peer_id = peer_id
        self.clients = clients
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.move_wait_s = move_wait_s
        self._sent: set[tuple[int, int, int, str]] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="report")

    def report(self, env: pb.Envelope, failed_peer: str, kind: str, detail: str) -> None:
        key = (env.round, env.microbatch, env.attempt, kind)  # a slow hop may still die: that is news
        with self._lock:
            if key in self._sent:
                return
            self._sent.add(key)
            if len(self._sent) > 4096:  # old rounds' keys are of no use any more
                self._sent = {k for k in self._sent if k[0] >= env.round - 1}
        self.metrics.failed_hops.labels(reason=kind).inc()
        report = pb.FailureReport(swarm_id=self.swarm, round=env.round, microbatch=env.microbatch,
                                  attempt=env.attempt, failed_peer=failed_peer, reason=f"{kind}: {detail}")
        origin = env.path[0]
        if origin.peer_id == self.peer_id:
            self._pool.submit(self.local, report, self.peer_id)
        else:
            self._pool.submit(self._send, origin.peer_id, origin.endpoint, report)

    def send_failed(self, env: pb.Envelope, code: grpc.StatusCode | None, detail: str) -> None:
        """`HopSender` gave up on delivering `env` (addressed to the hop that failed)."""
        target = env.path[env.hop].peer_id
        if code == grpc.StatusCode.FAILED_PRECONDITION and detail.startswith(HOP_CHECK):
            # The receiver refused what we sent as implausible and reports us itself: reporting it back would
            # only have the origin route around an honest receiver.
            log.warning("round %d microbatch %d: %s refused our hop: %s", env.round, env.microbatch, target[-8:],
                        detail)
            return
        if code == grpc.StatusCode.UNAVAILABLE:
            self.dead.declare(target, f"unreachable: {detail}")
            self.report(env, target, UNREACHABLE, detail)
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self.report(env, target, HUNG, detail)
        else:  # refused (or a local error): the peer is alive but will not take the hop; route around it
            self.report(env, target, REFUSED, f"{code.name if code else 'error'}: {detail}")

    def _send(self, origin: str, endpoint: str, report: pb.FailureReport) -> None:
        for _ in range(2):  # once more when the origin moved to another relay meanwhile
            try:
                self.clients.stub(endpoint, receiver=origin).ReportFailure(
                    self.signer.sign("ReportFailure", report, origin), timeout=self.timeout_s)
                return
            except grpc.RpcError as e:  # the origin itself is gone: its microbatches die with it
                if e.code() == grpc.StatusCode.UNAVAILABLE and self.clients.moved(origin, endpoint, self.move_wait_s):
                    continue
                log.info("could not report round %d microbatch %d's failure to its origin: %s", report.round,
                         report.microbatch, e.code().name)
                return

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


CLOSE_GRACE_S = 1.0  # how long a stopping node lets its last RoundDone notices travel


class RerouteNotifier:
    """Tells the round's nodes a microbatch's new path (ourselves directly), all at once, briefly."""

    def __init__(self, peer_id: str, clients: StageClients, signer: NoticeSigner, executor: StageExecutor,
                 timeout_s: float, workers: int, tries: int, move_wait_s: float):
        self.peer_id = peer_id
        self.move_wait_s = move_wait_s  # how long a relayed peer that does not answer may take to move
        self.clients = clients
        self.signer = signer  # each notice is signed for its receiver
        self.executor = executor
        self.timeout_s = timeout_s
        self.tries = tries  # a lost notice costs the receiver its round deadline: try a few times
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="notify")
        self._round_done: list[Future] = []  # RoundDone notices on their way

    def __call__(self, peers: dict[str, str], notice: pb.RerouteNotice) -> None:
        self.executor.reroute(notice.round, notice.microbatch, notice.attempt, list(notice.path))
        futures = [self._pool.submit(self._send, p, endpoint, notice, "Reroute", 0.0) for p, endpoint in peers.items()
                   if p != self.peer_id]
        for future in futures:
            future.result()

    def round_done(self, peers: dict[str, str], notice: pb.RoundDoneNotice) -> None:
        """Our microbatches of the round are all finished: nobody needs to keep the round open for us."""
        self.executor.origin_done(notice.round, notice.origin)
        self._round_done = [f for f in self._round_done if not f.done()]
        for p, endpoint in peers.items():
            if p != self.peer_id:
                self._round_done.append(self._pool.submit(self._send, p, endpoint, notice, "RoundDone",
                                                          self.move_wait_s))

    def _send(self, peer: str, endpoint: str, notice, method: str, move_wait_s: float) -> None:
        """`move_wait_s`: how long to wait, here, for a relayed peer that does not answer to announce another
        relay. A re-route waits for its notices, so it waits for none: such a notice follows in the background
        (lost, it costs its receiver the round's deadline)."""
        signed = self.signer.sign(method, notice, peer)
        for _ in range(self.tries):
            try:
                getattr(self.clients.stub(endpoint, receiver=peer), method)(signed, timeout=self.timeout_s)
                return
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE and self.clients.relayed(peer):
                    if not move_wait_s:
                        self._pool.submit(self._send, peer, endpoint, notice, method, self.move_wait_s)
                        return
                    if self.clients.moved(peer, endpoint, move_wait_s):
                        continue  # `stub` now dials it at its new relay
                if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # gone, or refused: retrying will not help
                    log.info("%s notice of round %d to %s failed: %s %s", method, notice.round, peer[-8:],
                             e.code().name, e.details())
                    return

    def close(self) -> None:
        """Stop; RoundDone notices already on their way get up to a second to land. A node that ends after its
        last round (--rounds) would otherwise often drop them, and its round's other nodes would wait out the
        round's deadline for a microbatch owner that is done. (A second: a stop must stay within seconds.)"""
        wait(self._round_done, timeout=min(self.timeout_s, CLOSE_GRACE_S))
        self._pool.shutdown(wait=False, cancel_futures=True)


class HopWatch:
    """Watches the hops this node forwarded and still waits on: is the next peer alive, is time up?"""

    def __init__(self, peer_id: str, executor: StageExecutor, clients: StageClients, reporter: FailureReporter,
                 dead: DeadPeers, interval_s: float, probe_timeout_s: float, hung_after_misses: int,
                 join_timeout_s: float):
        self.peer_id = peer_id
        self.executor = executor
        self.clients = clients
        self.reporter = reporter
        self.dead = dead
        self.interval_s = interval_s
        self.probe_timeout_s = probe_timeout_s
        self.hung_after_misses = hung_after_misses
        self.join_timeout_s = join_timeout_s
        self._hop_deadline_s = float("inf")  # set each round from its expected time
        self._misses: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hop-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def set_hop_deadline(self, seconds: float) -> None:
        """How long a hop may wait for its gradient this round (from the round's expected time)."""
        self._hop_deadline_s = seconds

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():  # never started when the role failed to build
            self._thread.join(timeout=self.probe_timeout_s + self.join_timeout_s)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # never let the watch die
                log.exception("hop watch failed")

    def check(self) -> None:
        now = time.monotonic()
        waiting = [s for s in self.executor.awaiting_backward() if now - s.since > self.interval_s]
        nexts = {s.env.path[s.env.hop + 1].peer_id: s.env.path[s.env.hop + 1].endpoint for s in waiting}
        verdicts = {peer: self._probe(peer, endpoint) for peer, endpoint in nexts.items() if peer != self.peer_id}
        for saved in waiting:
            env = saved.env
            nxt = env.path[env.hop + 1]
            verdict = verdicts.get(nxt.peer_id)
            if verdict is not None:
                self.dead.declare(nxt.peer_id, verdict)
                self.reporter.report(env, nxt.peer_id, verdict, f"hop {env.hop + 1} ({nxt.peer_id[-8:]}) {verdict}")
            elif now - saved.since > self._hop_deadline_s:  # alive but not serving us in time: avoid it this round
                self.reporter.report(env, nxt.peer_id, DEADLINE,
                                     f"no gradient for hop {env.hop} after {now - saved.since:.1f}s")

    def _probe(self, peer: str, endpoint: str) -> str | None:
        """None when the peer answers; UNREACHABLE or HUNG when it is taken as gone."""
        try:
            self.clients.ping(endpoint, self.probe_timeout_s, peer)
            self._misses.pop(peer, None)
            return None
        except grpc.RpcError as e:
            # A relayed peer that is not at its endpoint may be moving to another relay: only a miss.
            if e.code() == grpc.StatusCode.UNAVAILABLE and not self.clients.relayed(peer):
                return UNREACHABLE
            misses = self._misses.get(peer, 0) + 1
            self._misses[peer] = misses
            return HUNG if misses >= self.hung_after_misses else None
