"""What the swarm has spent or committed per domain, counting only what a claim may honestly say.

Nodes choose the domain furthest behind its share of expert FLOPs (experts/sizing.choose_domain), so an
inflated claim would starve a domain. Here an expert counts only if its publisher is a live member, for at
most `limit` (this node's plan for its domain, times --claim-flops-limit), and each peer for at most one
unfinished expert: an honest node trains one at a time. Anything else is clamped or ignored and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping

from protocol.records import ExpertRecord

log = logging.getLogger(__name__)


def committed_flops(records: Iterable[ExpertRecord], limit: Mapping[str, float], members: Collection[str],
                    on_refused: Callable[[str], None], skip: Callable[[ExpertRecord], bool] = lambda r: False
                    ) -> dict[str, float]:
    """FLOPs per domain of `limit`: finished experts count what they spent, unfinished ones what they plan.

    `skip`: records the caller leaves out (its own fresh claim, simultaneous claims that yield to it).
    """
    flops = {d: 0.0 for d in limit}
    unfinished: dict[str, ExpertRecord] = {}  # per peer, its furthest unfinished expert
    for record in records:
        if record.domain not in limit or skip(record):
            continue
        if record.peer_id not in members:
            log.warning("ignoring expert %s: its publisher %s is no live member", record.id, record.peer_id[-8:])
            on_refused("not_member")
            continue
        if record.complete:
            flops[record.domain] += _bounded(record, record.flops, limit, on_refused)
            continue
        kept = unfinished.get(record.peer_id)
        if kept is not None:
            log.warning("ignoring a second unfinished expert of %s", record.peer_id[-8:])
            on_refused("second_claim")
            if (kept.steps, kept.id) >= (record.steps, record.id):
                continue
        unfinished[record.peer_id] = record
    for record in unfinished.values():
        flops[record.domain] += _bounded(record, max(record.flops, record.planned_flops), limit, on_refused)
    return flops


def _bounded(record: ExpertRecord, flops: float, limit: Mapping[str, float], on_refused) -> float:
    """`flops` within [0, the domain's limit]; a value outside (or not a number) is clamped and counted."""
    bound = limit[record.domain]
    if 0 <= flops <= bound:
        return flops
    clamped = 0.0 if flops < 0 else bound  # NaN and infinities count as the bound
    log.warning("expert %s of %s claims %.3g FLOPs; counting %.3g, what the catalogue's plan allows", record.id,
                record.peer_id[-8:], flops, clamped)
    on_refused("claim_clamped")
    return clamped
