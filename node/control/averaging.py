"""Gradient averaging among the replicas of one stage, over the data plane (gRPC), in a group the plan fixes.

The group is the stage's replicas in the round's plan, minus peers declared dead: there is no
matchmaking. Each replica posts the sum of its gradients over the microbatches it processed, their
count and the digest of the weights it computed with; then it pulls the same from every other replica
at once (`FetchGradients`, which the owner answers as soon as it has posted). A replica that is gone
fails its pull at once (the connection is refused, or gRPC keepalive sees it hang); one that is alive
but slower is waited for until the round's deadline. Every replica sums what it got in peer-id order in
float64, so replicas that heard from the same group compute bit-identical averages.

This replaced hivemind's `DecentralizedAverager`: its matchmaking sometimes found no group
("could not find a group", then a full `--round-timeout` lost; 3 times in ~300 fault-free rounds), and
it counted replicas that had died or moved on, so a dead replica stalled its stage for good (issue 8).
Pulling from a fixed list also removes the averagers' forked processes.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from node.dataplane.transport import StageClients
from node.process.waits import wait_until
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.state_frames import decode_state, encode_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Contribution:
    """One replica's share of a round: gradient sums by parameter index, microbatches, weights digest."""

    grads: list[torch.Tensor]
    count: int
    digest: str


@dataclass(frozen=True)
class Averaged:
    grads: list[torch.Tensor]  # the mean gradient over every microbatch the group processed
    total: int  # microbatches the group processed
    peers: dict[str, tuple[int, str]]  # who took part (self included): (microbatches, weights digest)


class GradientExchange:
    """Posts this node's contributions and pulls its replicas'; one per node, for all hosted stages."""

    def __init__(self, swarm: str, peer_id: str, clients: StageClients, chunk_bytes: int, recheck_s: float,
                 keep_rounds: int = 2):
        self.swarm = swarm
        self.peer_id = peer_id
        self.clients = clients
        self.chunk_bytes = chunk_bytes
        self.recheck_s = recheck_s  # how often a waiting FetchGradients looks whether its caller is still there
        self.keep_rounds = keep_rounds  # a late replica may still pull an older round's contribution
        self._posted: dict[tuple[int, int], Contribution] = {}  # (stage, round) -> ours
        self._cv = threading.Condition()
        self._left_out_before = -1  # rounds below this one were never posted by us and never will be

    # ---- our side ---------------------------------------------------------------------------------------------
    def post(self, stage: int, round_: int, contribution: Contribution) -> None:
        with self._cv:
            self._posted[(stage, round_)] = contribution
            for key in [k for k in self._posted if k[1] < round_ - self.keep_rounds]:
                del self._posted[key]
            self._cv.notify_all()

    def passed(self, round_: int) -> None:
        """This node is done with `round_` (taken part or not): pulls for it that are not posted fail at once."""
        with self._cv:
            self._left_out_before = max(self._left_out_before, round_ + 1)
            self._cv.notify_all()

    def wait_posted(self, stage: int, round_: int, timeout: float,
                    cancelled: Callable[[], bool] = lambda: False) -> Contribution | None:
        """The serving side of FetchGradients: ours for (stage, round), once posted; None if it never will be
        (or the caller went away)."""
        with self._cv:
            posted = wait_until(self._cv, lambda: (stage, round_) in self._posted, timeout, self.recheck_s,
                                lambda: round_ < self._left_out_before or cancelled())
            return self._posted[(stage, round_)] if posted else None

    def encode(self, contribution: Contribution, round_: int, names: list[str]):
        tensors = {name: g for name, g in zip(names, contribution.grads)}
        return encode_state(tensors, {"count": str(contribution.count), "digest": contribution.digest}, round_,
                            self.chunk_bytes)

    # ---- the all-reduce --------------------------------------------------------------------------------------
    def average(self, stage: int, round_: int, names: list[str], mine: Contribution,
                replicas: dict[str, str], deadline: float, stop: threading.Event) -> Averaged:
        """Average `mine` with the contributions of `replicas` (peer id -> endpoint) reachable by `deadline`
        (monotonic), or until `stop`. Posts `mine` first, so the others can pull it."""
        self.post(stage, round_, mine)
        got: dict[str, Contribution] = {self.peer_id: mine}
        others = sorted(p for p in replicas if p != self.peer_id)
        if others:
            pool = ThreadPoolExecutor(max_workers=len(others), thread_name_prefix="avg")
            pulls = {p: pool.submit(self._pull, p, replicas[p], stage, round_, names, mine, deadline) for p in others}
            pool.shutdown(wait=False)
            for peer, future in pulls.items():
                while not future.done():
                    if stop.wait(self.recheck_s):
                        return Averaged(mine.grads, mine.count, {self.peer_id: (mine.count, mine.digest)})
                contribution = future.result()
                if contribution is not None:
                    got[peer] = contribution
        total = sum(c.count for c in got.values())
        summed = []
        for i, g in enumerate(mine.grads):
            acc = torch.zeros(g.shape, dtype=torch.float64)
            for peer in sorted(got):  # a fixed order: every replica rounds the same way
                acc += got[peer].grads[i].to("cpu", torch.float64)
            summed.append((acc / max(total, 1)).to(g.device, g.dtype))
        return Averaged(summed, total, {p: (c.count, c.digest) for p, c in got.items()})

    def _pull(self, peer: str, endpoint: str, stage: int, round_: int, names: list[str], mine: Contribution,
              deadline: float) -> Contribution | None:
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            return None
        request = pb.GradientRequest(swarm_id=self.swarm, stage=stage, round=round_)
        try:
            stub = self.clients.stub(endpoint, receiver=peer)
            _, tensors, metadata = decode_state(stub.FetchGradients(request, timeout=timeout))
        except grpc.RpcError as e:
            log.info("stage %d round %d: no gradients from %s (%s: %s)", stage, round_, endpoint, e.code().name,
                     e.details())
            return None
        except Exception as e:  # a truncated or corrupt blob: leave this replica out rather than step on it
            log.warning("stage %d round %d: unreadable gradients from %s: %r", stage, round_, endpoint, e)
            return None
        try:
            grads = [tensors[name] for name in names]
            count = int(metadata["count"])
        except (KeyError, ValueError):
            log.warning("stage %d round %d: gradients from %s lack some parameters; left out", stage, round_,
                        endpoint)
            return None
        if any(g.shape != m.shape for g, m in zip(grads, mine.grads)) or count < 0:
            log.warning("stage %d round %d: gradients from %s do not match this stage; left out", stage, round_,
                        endpoint)
            return None
        if not all(math.isfinite(float(g.sum())) for g in grads):
            log.warning("stage %d round %d: non-finite gradients from %s; left out", stage, round_, endpoint)
            return None
        return Contribution(grads, count, metadata.get("digest", ""))
