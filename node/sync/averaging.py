"""Gradient averaging among the replicas of one stage, over the data plane (gRPC), in a group the plan fixes.

The group is the stage's replicas in the round's plan, minus peers declared dead: there is no
matchmaking. Each replica posts the sum of its gradients over the microbatches it processed, their
count and the digest of the weights it computed with; the others pull it (`FetchGradients`, which the
owner answers as soon as it has posted). The plan names how (protocol/sync_names.py):

- `every-round` (reduce-scatter, then all-gather): the flattened gradients are cut into one shard per
  replica, in peer-id order. Each replica pulls its own shard of every other replica's sum, averages it,
  and posts the mean; then it pulls every other shard's mean from that shard's owner. Each replica moves
  about 2·G·(n-1)/n bytes each way. A shard whose owner fails to post its mean is averaged by each
  survivor itself, from the other replicas' sums of that shard.
- `all-to-all`: every replica pulls every other replica's whole sum: (n-1)·G bytes.

A post may name a lossy codec (`outer`'s pseudo-gradients, node/sync/outer.py): its shards and the means of
the shards it owns then travel encoded, and every replica, the producer included, uses the decoded values,
so all of them still compute the same average. Shards are then cut at multiples of ALIGN elements, so a
shard's blocks are the whole vector's blocks, and the producer can keep its error (`roundtrip`) once for
any number of shards.

With three or more contributions, one whose norm per microbatch exceeds `outlier_ratio` times the median of the
group's is left out of the mean (of a shard, under every-round and outer; of the whole, under all-to-all) and
counted as `outlier`: a replica that posts a huge gradient, honest by mistake or not, cannot swing the step of the
others. Every replica applies the same rule to the same values, so the averages stay bit-identical. With two, the
median cannot tell which is wrong, and both count.

A replica that is gone fails its pull at once (the connection is refused, or gRPC keepalive sees it hang);
one that is alive but slower is waited for until the round's deadline. Sums are taken in peer-id order in
float64, so replicas that heard from the same group compute bit-identical averages (and a replica that
drifted anyway is repaired by the digest vote in node/control/rounds.py).

This replaced hivemind's `DecentralizedAverager`: its matchmaking sometimes found no group
("could not find a group", then a full `--round-timeout` lost; 3 times in ~300 fault-free rounds), and
it counted replicas that had died or moved on, so a dead replica stalled its stage for good (issue 8).
Pulling from a fixed list also removes the averagers' forked processes.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import grpc
import torch

from node.dataplane.transport import StageClients
from node.process.waits import wait_until
from protocol.codecs import CodecError, get_codec
from protocol.errors import ProtocolError
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.state_frames import decode_state, encode_state
from protocol.sync_names import ALL_TO_ALL, EVERY_ROUND

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Contribution:
    """One replica's share of a round: gradient sums by parameter index, microbatches, weights digest, and the
    codec its shards travel in."""

    grads: list[torch.Tensor]
    count: int
    digest: str
    codec: str = "raw"


@dataclass(frozen=True)
class Averaged:
    grads: list[torch.Tensor]  # the mean gradient over every microbatch the group processed
    total: int  # microbatches the group processed
    peers: dict[str, tuple[int, str]]  # who took part (self included): (microbatches, weights digest)


MAX_SHARDS = 1024  # far above any replica group: a request for more shards is malformed
ALIGN = 1024  # coded shards start at multiples of this: a multiple of every blockwise codec's block
SYNC_CODECS = ("raw", "bf16", "int8", "int4")  # deterministic codecs: the same input encodes the same everywhere


def outliers(norms: dict[str, float], ratio: float) -> set[str]:
    """The peers whose norm per microbatch (`norms`) exceeds `ratio` times the group's median, among three or more;
    none among fewer (with two, the median cannot tell which one is wrong)."""
    if len(norms) < 3:
        return set()
    median = statistics.median(norms.values())
    return {peer for peer, norm in norms.items() if norm > ratio * median}


def shard_bounds(elements: int, shards: int, align: int = 1) -> list[tuple[int, int]]:
    """[start, end) of each of `shards` near-equal slices of `elements` flattened values, cut at multiples of
    `align` (the last slice ends at `elements`)."""
    cuts = [min(elements, (k * elements // shards) // align * align) for k in range(shards)] + [elements]
    return [(cuts[k], cuts[k + 1]) for k in range(shards)]


def roundtrip(flat: torch.Tensor, codec: str) -> torch.Tensor:
    """`flat` as a receiver decodes it after `codec` (itself for raw): what the producer of a coded value uses."""
    if codec == "raw" or not flat.numel():
        return flat
    c = get_codec(codec)
    layout = c.layout_for(tuple(flat.shape))
    return c.decode(c.encode(flat, layout), tuple(flat.shape), torch.float32, layout, flat.device)


def _encoded(values: torch.Tensor, codec: str, metadata: dict[str, str]) -> tuple[dict, dict]:
    """The tensors and metadata that carry `values` (1-D float32) in `codec`."""
    if codec == "raw" or not values.numel():
        return {"values": values}, metadata
    c = get_codec(codec)
    return {"payload": c.encode(values, c.layout_for(tuple(values.shape)))}, {**metadata, "codec": codec}


def _decoded(tensors: dict[str, torch.Tensor], metadata: dict[str, str], length: int) -> torch.Tensor:
    """The 1-D float32 values of `length` elements that `_encoded` sent; ValueError if they do not fit."""
    codec = metadata.get("codec", "raw")
    if codec == "raw":
        values = tensors.get("values")
        if values is None or values.shape != (length,) or values.dtype != torch.float32:
            raise ValueError(f"expected {length} float32 values")
        return values
    if codec not in SYNC_CODECS:
        raise ValueError(f"codec {codec!r} is not one a sync speaks ({', '.join(SYNC_CODECS)})")
    c = get_codec(codec)
    layout = c.layout_for((length,))
    payload = tensors.get("payload")
    expected = c.wire_bytes((length,), 4, layout)
    if payload is None or payload.dtype != torch.uint8 or payload.shape != (expected,):
        raise ValueError(f"a {codec} payload of {length} values takes {expected} bytes")
    try:
        return c.decode(payload, (length,), torch.float32, layout, torch.device("cpu"))
    except CodecError as e:
        raise ValueError(str(e)) from None


def flatten(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.detach().reshape(-1).to("cpu", torch.float32) for g in grads]) if grads \
        else torch.zeros(0)


def unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for g in like:
        out.append(flat[start:start + g.numel()].reshape(g.shape).to(g.device, g.dtype))
        start += g.numel()
    return out


@dataclass(frozen=True)
class MeanShard:
    """The group's mean of one shard of the flattened gradients, as the shard's owner computed it."""

    values: torch.Tensor  # float32
    total: int  # microbatches the group processed
    peers: dict[str, tuple[int, str]]  # whose sums it holds: (microbatches, weights digest)
    codec: str = "raw"  # how it travels


class GradientExchange:
    """Posts this node's contributions (and, under every-round, the means of the shards it owns) and pulls its
    replicas'; one per node, for all hosted stages."""

    def __init__(self, swarm: str, peer_id: str, clients: StageClients, chunk_bytes: int, recheck_s: float,
                 keep_rounds: int = 2, refused: Callable[[str], None] = lambda reason: None,
                 outlier_ratio: float = math.inf):
        """`refused(reason)` counts a replica's share left out: unreadable, mismatch, non_finite or outlier.
        `outlier_ratio`: see the module's docstring (infinite: every contribution counts)."""
        self.outlier_ratio = outlier_ratio
        self.swarm = swarm
        self.peer_id = peer_id
        self.clients = clients
        self.chunk_bytes = chunk_bytes
        self.recheck_s = recheck_s  # how often a waiting FetchGradients looks whether its caller is still there
        self.keep_rounds = keep_rounds  # a late replica may still pull an older round's contribution
        # (stage, round) -> ours, flattened, and flattened as the others decode it (the same unless coded)
        self._posted: dict[tuple[int, int], tuple[Contribution, torch.Tensor, torch.Tensor]] = {}
        self._means: dict[tuple[int, int, int, int], MeanShard] = {}  # (stage, round, shard, shards) -> mean
        self._cv = threading.Condition()
        self._left_out_before = -1  # rounds below this one were never posted by us and never will be
        self.refused = refused

    # ---- our side ---------------------------------------------------------------------------------------------
    def post(self, stage: int, round_: int, contribution: Contribution) -> None:
        flat = flatten(contribution.grads)
        decoded = roundtrip(flat, contribution.codec)
        with self._cv:
            self._posted[(stage, round_)] = (contribution, flat, decoded)
            for key in [k for k in self._posted if k[1] < round_ - self.keep_rounds]:
                del self._posted[key]
            for key in [k for k in self._means if k[1] < round_ - self.keep_rounds]:
                del self._means[key]
            self._cv.notify_all()

    def _post_mean(self, stage: int, round_: int, shard: int, shards: int, mean: MeanShard) -> None:
        with self._cv:
            self._means[(stage, round_, shard, shards)] = mean
            self._cv.notify_all()

    def passed(self, round_: int) -> None:
        """This node is done with `round_` (taken part or not): pulls for it that are not posted fail at once."""
        with self._cv:
            self._left_out_before = max(self._left_out_before, round_ + 1)
            self._cv.notify_all()

    def _wait(self, key, table: dict, round_: int, timeout: float, cancelled: Callable[[], bool]):
        with self._cv:
            there = wait_until(self._cv, lambda: key in table, timeout, self.recheck_s,
                               lambda: round_ < self._left_out_before or cancelled())
            return table[key] if there else None

    def wait_posted(self, stage: int, round_: int, timeout: float,
                    cancelled: Callable[[], bool] = lambda: False) -> Contribution | None:
        """Ours for (stage, round), once posted; None if it never will be (or the caller went away)."""
        posted = self._wait((stage, round_), self._posted, round_, timeout, cancelled)
        return posted[0] if posted else None

    def serve(self, request: pb.GradientRequest, names: list[str], timeout: float,
              cancelled: Callable[[], bool]) -> Iterator[pb.StateChunk]:
        """The answer to FetchGradients: our sum (whole, or one shard of it) or the mean of a shard we own."""
        stage, round_, shard, shards = request.stage, request.round, request.shard, request.shards
        if not 0 <= shards <= MAX_SHARDS or (shards and not 0 <= shard < shards) or (request.averaged and not shards):
            raise ProtocolError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"shard {shard} of {shards}{' (averaged)' if request.averaged else ''} does not exist "
                                f"(shards: 0 for the whole sum, or 1..{MAX_SHARDS})")
        if request.averaged:
            mean = self._wait((stage, round_, shard, shards), self._means, round_, timeout, cancelled)
            if mean is None:
                raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"no mean of stage {stage} round {round_} shard {shard} of {shards}: this node "
                                    f"did not average it")
            tensors, meta = _encoded(mean.values, mean.codec,
                                     {"total": str(mean.total), "peers": json.dumps(mean.peers)})
            return encode_state(tensors, meta, round_, self.chunk_bytes)
        posted = self._wait((stage, round_), self._posted, round_, timeout, cancelled)
        if posted is None:
            raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"no gradients for stage {stage} round {round_}: this node did not take part")
        mine, flat, _ = posted
        meta = {"count": str(mine.count), "digest": mine.digest}
        if not shards:
            if mine.codec != "raw":
                raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"stage {stage} round {round_} is averaged by shards ({mine.codec}); ask for one")
            return encode_state(dict(zip(names, mine.grads)), meta, round_, self.chunk_bytes)
        start, end = shard_bounds(flat.numel(), shards, _align(mine.codec))[shard]
        tensors, meta = _encoded(flat[start:end], mine.codec, meta)
        return encode_state(tensors, meta, round_, self.chunk_bytes)

    # ---- the all-reduce --------------------------------------------------------------------------------------
    def average(self, stage: int, round_: int, names: list[str], mine: Contribution,
                replicas: dict[str, str], deadline: float, stop: threading.Event,
                strategy: str = EVERY_ROUND) -> Averaged:
        """Average `mine` with the contributions of `replicas` (peer id -> endpoint) reachable by `deadline`
        (monotonic), or until `stop`, as `strategy` says. Posts `mine` first, so the others can pull it."""
        self.post(stage, round_, mine)
        # Our own mean: what a replica without a group, or one told to stop, steps with.
        alone = Averaged([(g.to(torch.float64) / max(mine.count, 1)).to(g.dtype) for g in mine.grads], mine.count,
                         {self.peer_id: (mine.count, mine.digest)})
        group = sorted({*replicas, self.peer_id})
        if len(group) == 1:
            return alone
        if strategy == ALL_TO_ALL and mine.codec == "raw":
            return self._all_to_all(stage, round_, names, mine, replicas, deadline, stop) or alone
        return self._reduce_scatter(stage, round_, mine, group, replicas, deadline, stop) or alone

    def _gather(self, pulls: dict[str, Callable[[], object]], stop: threading.Event) -> dict[str, object] | None:
        """Run every pull at once; their results by key (None for a failed one), or None once `stop` is set."""
        if not pulls:
            return {}
        pool = ThreadPoolExecutor(max_workers=len(pulls), thread_name_prefix="avg")
        futures = {key: pool.submit(pull) for key, pull in pulls.items()}
        pool.shutdown(wait=False)
        pending = set(futures.values())
        while pending:  # woken by the pulls as they end, not by the recheck: a phase takes its pulls' time
            _, pending = wait(pending, timeout=self.recheck_s)
            if stop.is_set():
                return None
        return {key: future.result() for key, future in futures.items()}

    def _all_to_all(self, stage: int, round_: int, names: list[str], mine: Contribution, replicas: dict[str, str],
                    deadline: float, stop: threading.Event) -> Averaged | None:
        others = sorted(p for p in replicas if p != self.peer_id)
        pulled = self._gather({p: lambda p=p: self._pull_whole(p, replicas[p], stage, round_, names, mine, deadline)
                               for p in others}, stop)
        if pulled is None:
            return None
        got = {self.peer_id: mine, **{p: c for p, c in pulled.items() if c is not None}}
        got = self._without_outliers(got, lambda c: (math.sqrt(sum(float(g.double().pow(2).sum()) for g in c.grads)),
                                                     c.count), stage, round_, "gradients")
        total = sum(c.count for c in got.values())
        summed = []
        for i, g in enumerate(mine.grads):
            acc = torch.zeros(g.shape, dtype=torch.float64)
            for peer in sorted(got):  # a fixed order: every replica rounds the same way
                acc += got[peer].grads[i].to("cpu", torch.float64)
            summed.append((acc / max(total, 1)).to(g.device, g.dtype))
        return Averaged(summed, total, {p: (c.count, c.digest) for p, c in got.items()})

    def _reduce_scatter(self, stage: int, round_: int, mine: Contribution, group: list[str],
                        replicas: dict[str, str], deadline: float, stop: threading.Event) -> Averaged | None:
        shards = len(group)
        with self._cv:
            flat = self._posted[(stage, round_)][2]  # our share as the others decode it
        bounds = shard_bounds(flat.numel(), shards, _align(mine.codec))
        me = group.index(self.peer_id)
        own = self._mean_of(stage, round_, me, shards, bounds[me], mine, flat, group, replicas, deadline, stop)
        if own is None:
            return None
        self._post_mean(stage, round_, me, shards, own)
        owners = {k: p for k, p in enumerate(group) if p != self.peer_id}
        means = self._gather({k: lambda k=k: self._pull_mean(owners[k], replicas[owners[k]], stage, round_, k, shards,
                                                             bounds[k][1] - bounds[k][0], mine.codec, deadline)
                              for k in owners}, stop)
        if means is None:
            return None
        means[me] = own
        for k in owners:
            if means[k] is None:  # its owner is gone or never averaged it: average that shard ourselves
                log.info("stage %d round %d: no mean of shard %d from %s; averaging it here", stage, round_, k,
                         owners[k][-8:])
                means[k] = self._mean_of(stage, round_, k, shards, bounds[k], mine, flat, group, replicas,
                                         deadline, stop, without={owners[k]})
                if means[k] is None:
                    return None
        averaged = unflatten(torch.cat([means[k].values for k in range(shards)]), mine.grads)
        peers = dict(own.peers)
        for k in range(shards):
            peers.update(means[k].peers)
        return Averaged(averaged, own.total, peers)

    def _mean_of(self, stage: int, round_: int, shard: int, shards: int, bound: tuple[int, int], mine: Contribution,
                 flat: torch.Tensor, group: list[str], replicas: dict[str, str], deadline: float,
                 stop: threading.Event, without: set[str] = frozenset()) -> MeanShard | None:
        """The group's mean of one shard: every other replica's sum of it, pulled at once, summed in peer order."""
        start, end = bound
        others = [p for p in group if p != self.peer_id and p not in without]
        pulled = self._gather({p: lambda p=p: self._pull_shard(p, replicas[p], stage, round_, shard, shards,
                                                               end - start, deadline) for p in others}, stop)
        if pulled is None:
            return None
        got = {self.peer_id: (flat[start:end], mine.count, mine.digest),
               **{p: c for p, c in pulled.items() if c is not None}}
        got = self._without_outliers(got, lambda c: (float(c[0].double().norm()), c[1]), stage, round_,
                                     f"shard {shard}")
        total = sum(count for _, count, _ in got.values())
        acc = torch.zeros(end - start, dtype=torch.float64)
        for peer in sorted(got):  # a fixed order: whoever averages this shard rounds the same way
            acc += got[peer][0].to(torch.float64)
        # A coded mean travels coded: its owner, too, keeps what the others will decode.
        return MeanShard(roundtrip((acc / max(total, 1)).to(torch.float32), mine.codec), total,
                         {p: (count, digest) for p, (_, count, digest) in got.items()}, mine.codec)

    def _without_outliers(self, got: dict, norm_and_count: Callable[[object], tuple[float, int]], stage: int,
                          round_: int, what: str) -> dict:
        """`got` less the contributions `outliers` names (by their norm per microbatch; those of no microbatch
        carry nothing and are not judged), each logged and counted."""
        if len(got) < 3 or math.isinf(self.outlier_ratio):  # nothing to judge: spare the hot path the norms
            return got
        measured = {p: norm_and_count(c) for p, c in got.items()}
        norms = {p: norm / count for p, (norm, count) in measured.items() if count > 0}
        far = outliers(norms, self.outlier_ratio)
        median = statistics.median(norms.values()) if far else 0.0
        for peer in sorted(far):
            self._left_out("outlier", stage, round_, f"{what} from {peer[-8:]}: its norm per microbatch is "
                           f"{norms[peer] / median:.0f}x the group's median (limit {self.outlier_ratio:g}x)")
        return {p: c for p, c in got.items() if p not in far}

    # ---- pulls -----------------------------------------------------------------------------------------------
    def _fetch(self, peer: str, endpoint: str, request: pb.GradientRequest, deadline: float, what: str):
        """(tensors, metadata) of one FetchGradients, or None (logged) when it failed."""
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            return None
        try:
            stub = self.clients.stub(endpoint, receiver=peer)
            _, tensors, metadata = decode_state(stub.FetchGradients(request, timeout=timeout))
            return tensors, metadata
        except grpc.RpcError as e:
            log.info("stage %d round %d: no %s from %s (%s: %s)", request.stage, request.round, what, endpoint,
                     e.code().name, e.details())
        except Exception as e:  # a truncated or corrupt blob: leave this replica out rather than step on it
            self._left_out("unreadable", request.stage, request.round, f"unreadable {what} from {endpoint}: {e!r}")
        return None

    def _left_out(self, reason: str, stage: int, round_: int, why: str) -> None:
        log.warning("stage %d round %d: %s; left out", stage, round_, why)
        self.refused(reason)

    def _request(self, stage: int, round_: int, shard: int = 0, shards: int = 0,
                 averaged: bool = False) -> pb.GradientRequest:
        return pb.GradientRequest(swarm_id=self.swarm, stage=stage, round=round_, shard=shard, shards=shards,
                                  averaged=averaged)

    def _pull_whole(self, peer: str, endpoint: str, stage: int, round_: int, names: list[str], mine: Contribution,
                    deadline: float) -> Contribution | None:
        fetched = self._fetch(peer, endpoint, self._request(stage, round_), deadline, "gradients")
        if fetched is None:
            return None
        tensors, metadata = fetched
        try:
            grads = [tensors[name] for name in names]
            count = int(metadata["count"])
        except (KeyError, ValueError):
            self._left_out("mismatch", stage, round_, f"gradients from {endpoint} lack some parameters")
            return None
        if any(g.shape != m.shape for g, m in zip(grads, mine.grads)) or count < 0:
            self._left_out("mismatch", stage, round_, f"gradients from {endpoint} do not match this stage")
            return None
        if not all(math.isfinite(float(g.sum())) for g in grads):
            self._left_out("non_finite", stage, round_, f"non-finite gradients from {endpoint}")
            return None
        return Contribution(grads, count, metadata.get("digest", ""))

    def _pull_shard(self, peer: str, endpoint: str, stage: int, round_: int, shard: int, shards: int, length: int,
                    deadline: float) -> tuple[torch.Tensor, int, str] | None:
        """Another replica's sum of one shard: (values, microbatches, weights digest)."""
        fetched = self._fetch(peer, endpoint, self._request(stage, round_, shard, shards), deadline, f"shard {shard}")
        if fetched is None:
            return None
        tensors, metadata = fetched
        count = metadata.get("count", "")
        try:
            values = _decoded(tensors, metadata, length)
        except ValueError as e:
            self._left_out("mismatch", stage, round_, f"shard {shard} from {endpoint} does not match this stage: {e}")
            return None
        if not count.isdigit():
            self._left_out("mismatch", stage, round_, f"shard {shard} from {endpoint} has no microbatch count")
            return None
        if not bool(torch.isfinite(values).all()):
            self._left_out("non_finite", stage, round_, f"non-finite shard {shard} from {endpoint}")
            return None
        return values.to(torch.float32), int(count), metadata.get("digest", "")

    def _pull_mean(self, peer: str, endpoint: str, stage: int, round_: int, shard: int, shards: int, length: int,
                   codec: str, deadline: float) -> MeanShard | None:
        fetched = self._fetch(peer, endpoint, self._request(stage, round_, shard, shards, averaged=True), deadline,
                              f"mean of shard {shard}")
        if fetched is None:
            return None
        tensors, metadata = fetched
        try:
            values = _decoded(tensors, metadata, length)
            total = int(metadata["total"])
            peers = {str(p): (int(c), str(d)) for p, (c, d) in json.loads(metadata["peers"]).items()}
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            self._left_out("mismatch", stage, round_, f"the mean of shard {shard} from {endpoint} does not match "
                           f"this stage ({e}); averaging it here")
            return None
        if not bool(torch.isfinite(values).all()):
            self._left_out("non_finite", stage, round_, f"the mean of shard {shard} from {endpoint} is not finite; "
                           "averaging it here")
            return None
        return MeanShard(values.to(torch.float32), total, peers, metadata.get("codec", codec))


def _align(codec: str) -> int:
    return 1 if codec == "raw" else ALIGN
