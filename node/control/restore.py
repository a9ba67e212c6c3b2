"""Where a starting node's stages come from. For each hosted stage, in order:

1. its own checkpoint in --checkpoint-dir (a node restarted with the same identity and directory);
2. a serving replica's live state, when it is newer (a joining replica, or a restarted one catching up);
3. when the stage has no replica left and the swarm has trained: the newest checkpoint any live peer holds
   of it, else CheckFree: the weighted average of its neighbouring stages' decoder layers;
4. otherwise (a new swarm) the seeded initialisation.

The log says which source each stage came from; a trained swarm's stage never restarts from random
weights without a WARNING saying so.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable

import grpc
import torch

from node.control.checkpoint import StageCheckpoints
from node.host.metrics import NodeMetrics
from node.stage.trainer import StageTrainer
from node.dataplane.transport import StageClients
from protocol.records import NodeRecord

log = logging.getLogger(__name__)

_LAYER = re.compile(r"^param/layers\.(\d+)\.(.+)$")


def restore_stages(trainers: dict[int, StageTrainer], members: dict[str, NodeRecord], me: str, swarm: str,
                   num_stages: int, clients: StageClients, checkpoints: StageCheckpoints | None,
                   metrics: NodeMetrics, events: Callable[..., None], stop: threading.Event,
                   transfer_timeout: float) -> int:
    """Load each hosted stage from the best source; returns the round this node starts at (early when `stop`)."""
    # replicas that peers can dial (an unreachable one could not answer FetchState)
    serving = {p: r for p, r in members.items() if r.plannable and p != me}
    swarm_round = max((r.round for r in serving.values()), default=0)
    for stage, trainer in trainers.items():
        source, completed = None, -1

        def loaded(how: str, round_: int) -> None:
            metrics.stage_recoveries.labels(source=how).inc()
            events("stage_recovered", stage=stage, source=how, round=round_)

        if checkpoints is not None and (saved := checkpoints.latest(stage)) is not None:
            completed, tensors, metadata, path = saved
            trainer.load(tensors, metadata)
            source = "checkpoint"
            log.info("stage %d: resumed from its checkpoint after round %d (%s)", stage, completed, path)
            loaded(source, completed)
        replicas = sorted(p for p, r in serving.items() if stage in r.stages and r.round > 0)
        answered = False  # a dead replica's record outlives it: only one that answers counts
        for peer in replicas:
            if stop.is_set():
                return swarm_round
            try:
                got, tensors, metadata = clients.fetch_state(serving[peer].endpoint, swarm, stage, receiver=peer,
                                                             timeout=transfer_timeout)
            except grpc.RpcError as e:
                log.warning("could not fetch stage %d from %s: %s", stage, peer[-8:], e.details())
                continue
            answered = True
            if got > completed:
                trainer.load(tensors, metadata, source=peer)
                log.info("stage %d: caught up to round %d from replica %s", stage, got, peer[-8:])
                source, completed = "replica", got
                loaded(source, completed)
            break
        if not answered and source is None and swarm_round > 0:
            source, completed = _rebuild_lost(stage, trainer, serving, swarm, num_stages, clients, transfer_timeout)
            if source is not None:
                loaded(source, completed)
        swarm_round = max(swarm_round, completed + 1)
    return swarm_round


def _rebuild_lost(stage: int, trainer: StageTrainer, serving: dict[str, NodeRecord], swarm: str, num_stages: int,
                  clients: StageClients, timeout: float) -> tuple[str | None, int]:
    """The stage's last replica is gone: the newest checkpoint a live peer holds, else CheckFree."""
    best = None
    for peer, record in sorted(serving.items()):
        try:
            got, tensors, metadata = clients.fetch_state(record.endpoint, swarm, stage, receiver=peer, timeout=timeout)
        except grpc.RpcError:
            continue  # no checkpoint of it there
        if best is None or got > best[0]:
            best = (got, tensors, metadata, peer)
    if best is not None:
        got, tensors, metadata, peer = best
        trainer.load(tensors, metadata)  # that checkpoint's sync in flight, if any, was its own: no donor applied it
        log.warning("stage %d had no replica left: rebuilt from %s's checkpoint after round %d", stage, peer[-8:], got)
        return "peer_checkpoint", got
    neighbours = {}
    for other in (stage - 1, stage + 1):
        if not 0 <= other < num_stages:
            continue
        for peer, record in sorted(serving.items()):
            if other not in record.stages:
                continue
            try:
                neighbours[other] = clients.fetch_state(record.endpoint, swarm, other, receiver=peer,
                                                        timeout=timeout)
                break
            except grpc.RpcError as e:
                log.warning("could not fetch neighbouring stage %d from %s: %s", other, peer[-8:], e.details())
    rebuilt = checkfree(trainer, {s: (t, m) for s, (_, t, m) in neighbours.items()})
    if rebuilt:
        completed = max(got for got, _, _ in neighbours.values())
        with trainer.lock:
            trainer.completed_round = completed
        log.warning("stage %d had no replica and no checkpoint left: rebuilt by CheckFree from stages %s "
                    "(weighted average of their layers, weights %s)", stage, sorted(rebuilt), rebuilt)
        return "checkfree", completed
    log.warning("stage %d has no replica, checkpoint or neighbour to rebuild from: it starts from the seeded "
                "initialisation", stage)
    return None, -1


def checkfree(trainer: StageTrainer, neighbours: dict[int, tuple[dict[str, torch.Tensor], dict[str, str]]]
              ) -> dict[int, float]:
    """CheckFree (arXiv 2506.15461): set the stage's decoder layers to the average of its neighbours' layers,
    weighted by each neighbour's last gradient norm; the k-th layer takes each neighbour's k-th layer
    (cycling when a neighbour has fewer). Returns the weights used, by neighbour; {} when none has layers."""
    layers: dict[int, list[dict[str, torch.Tensor]]] = {}
    weights: dict[int, float] = {}
    for s, (tensors, metadata) in neighbours.items():
        by_layer: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            if (m := _LAYER.match(name)) is not None:
                by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
        if by_layer:
            layers[s] = [by_layer[i] for i in sorted(by_layer)]
            weights[s] = float(metadata.get("grad_norm", "1") or 1) or 1.0
    if not layers:
        return {}
    total = sum(weights.values())
    weights = {s: w / total for s, w in weights.items()}
    own = sorted({int(m.group(1)) for n in trainer.names if (m := _LAYER.match(f"param/{n}"))})
    with trainer.lock, torch.no_grad():
        params = dict(zip(trainer.names, trainer.params))
        for k, layer_id in enumerate(own):
            for name, p in params.items():
                prefix = f"layers.{layer_id}."
                if not name.startswith(prefix):
                    continue
                suffix = name[len(prefix):]
                p.copy_(sum(w * layers[s][k % len(layers[s])][suffix].to(p.dtype) for s, w in weights.items()))
        trainer.rebuilt()
    return {s: round(w, 3) for s, w in weights.items()}
