"""The work each peer did for this node, as this node saw it: the hops it took from that peer, their tokens, and
how its hop checks judged them (node/stage/hop_checks.py).

A node publishes what it witnessed in its record (`witnessed`), and `swarm-node status` adds up, for each peer,
what the others saw: a peer's work as its receivers counted it, never as it claims it. The receipt a receiver
returns for each hop (the Ack's `tokens` and `checked`) lets the sender count the same work on its side
(`swarm_node_hops_acknowledged_total`), so an operator sees that their node is counted.

The sender of a hop is the one its path names: frames are tagged with the swarm key, not the sender's own
(docs/trust.md), so within a swarm a member can credit or blame another.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.records import MAX_WITNESSED, WORK_KEYS


class Witness:
    def __init__(self, max_peers: int = MAX_WITNESSED):
        self.max_peers = max_peers  # the peers seen longest ago are forgotten first (the record has room for these)
        self._work: OrderedDict[str, dict[str, int]] = OrderedDict()
        self._lock = threading.Lock()

    def took(self, peer: str, tokens: int, judged: bool) -> None:
        """A hop from `peer` of `tokens` tokens was accepted; `judged`: its size was judged against a learned band
        and passed."""
        with self._lock:
            work = self._of(peer)
            work["hops"] += 1
            work["tokens"] += tokens
            work["passed"] += int(judged)

    def refused(self, peer: str) -> None:
        """A hop from `peer` failed a hop check."""
        with self._lock:
            self._of(peer)["failed"] += 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        """peer -> {hops, tokens, passed, failed}, for the record."""
        with self._lock:
            return {peer: dict(work) for peer, work in self._work.items()}

    def _of(self, peer: str) -> dict[str, int]:
        """The caller holds the lock."""
        work = self._work.get(peer)
        if work is None:
            work = self._work[peer] = dict.fromkeys(WORK_KEYS, 0)
            while len(self._work) > self.max_peers:
                self._work.popitem(last=False)
        self._work.move_to_end(peer)
        return work


def receipt_tokens(receipt: pb.Ack, tensor: torch.Tensor) -> int | None:
    """The tokens a receiver's receipt acknowledges for a hop we sent as `tensor` ([batch, seq, ...]); None when
    the receipt claims other than the hop carried (a receiver's word is counted only where it can be checked)."""
    sent = tensor.shape[0] * tensor.shape[1] if tensor.dim() >= 2 else 0
    return receipt.tokens if receipt.tokens == sent else None


def witnessed_by_others(witnessed: dict[str, dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    """`witnessed`: each node's published view (node -> peer -> work). Returns, for each peer, the sum of what
    the other nodes saw it do (a node's view of itself, which no hop produces, is ignored)."""
    totals: dict[str, dict[str, int]] = {}
    for node, seen in witnessed.items():
        for peer, work in seen.items():
            if peer == node:
                continue
            total = totals.setdefault(peer, dict.fromkeys(WORK_KEYS, 0))
            for key in WORK_KEYS:
                total[key] += work[key]
    return totals
