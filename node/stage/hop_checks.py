"""Cheap checks on every hop a peer sends us: its values are finite, and its size is what that stage sends.

The size is the tensor's RMS. For each (sender's stage, direction) the node keeps a running mean of log-RMS
over the hops it accepted (a hop it refuses for any reason, such as a forged envelope of another round,
teaches nothing); once it has seen `warmup` of them, an activation whose RMS is more than `band` times that
mean, or less than 1/`band` of it, is refused. Honest activations move slowly (the mean follows), while a
scaled or noised tensor jumps by orders of magnitude. Gradients are checked for finite values only, their
size observed but not judged: it follows the loss and the path (one in a few thousand honest gradients was
over 10x its mean, and one jumped 16x when a stage was lost and rebuilt). A check costs one pass over the
tensor, which was just decoded.

A node that saw no hop from a stage for `stale_rounds` rounds (left out of plans, banned, just joined) learns
that band again, accepting its first `warmup` hops unjudged: the weights may have moved meanwhile, and a stale
band refuses honest hops. So does a band learned before an outer step (`--sync outer`), which moves every
replica's weights at once: hops of rounds that compute after different outer steps (`epoch`) are judged by
separate bands, each learned from its first `warmup` hops.

What it cannot see: a tensor of honest size and wrong values (a flipped or scaled gradient, a stale stage),
and who really sent a hop (frames are tagged with the swarm key, not the sender's: a member can forge an
in-plan hop in another's name). That needs
a recomputation of the hop, which these checks do not do.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

NON_FINITE, SIZE = "non_finite", "size"  # refusal kinds (swarm_node_hops_refused_total{reason})
# Directions whose size is judged. Gradients are only observed (swarm_node_hop_size_ratio): their honest size
# follows the loss and the path, and jumped 16x at a stage's loss and rebuild in tests/node/test_faults.py.
SIZED = ("forward",)
HOP_CHECK = "hop check"  # how a refusal's status detail begins: its sender knows it is reported, not failed


class Refusal(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class Sample:
    key: tuple[str, int, int]  # (direction, sender's stage, the weights' epoch of its round)
    log_rms: float
    round: int
    judged: bool  # its size was judged against a learned band (and, if accepted, passed)


@dataclass(frozen=True)
class _Band:
    seen: int  # hops accepted since the last warm-up began
    mean: float  # of their log-RMS (a running mean once warmed up)
    round: int  # of the last one


class HopChecks:
    def __init__(self, band: float, warmup: int, smoothing: float, stale_rounds: int,
                 observe: Callable[[str, float], None] = lambda direction, ratio: None,
                 epoch: Callable[[int], int] = lambda round_: 0):
        self.log_band = math.log(band)
        self.observe = observe  # (direction, factor >= 1 off the band's mean) of every hop judged
        self.warmup = warmup
        self.smoothing = smoothing  # the share of each accepted hop in the running mean
        # A node left out of plans for a while has not seen the weights move: after this many rounds without a
        # hop from a stage, its band is learned again (the weights may have grown it tenfold meanwhile).
        self.stale_rounds = stale_rounds
        # Rounds of different epochs compute with weights an outer step apart (node/sync/outer_sync.py).
        self.epoch = epoch
        self._bands: dict[tuple[str, int, int], _Band] = {}  # by Sample.key
        self._lock = threading.Lock()

    def check(self, direction: str, stage: int, tensor: torch.Tensor, round_: int) -> Sample:
        """Raise `Refusal` for a hop of `round_` that `stage` sent in `direction` ("forward" or "backward") and
        that fails a check. Learns nothing: `learn` the returned sample once the hop is accepted, so that hops
        the node refuses anyway (a forged envelope of another round) cannot move the band."""
        values = tensor.detach().float()
        if not torch.isfinite(values).all():
            raise Refusal(NON_FINITE, f"{direction} hop from stage {stage} has non-finite values")
        rms = values.pow(2).mean().sqrt().item()
        key = (direction, stage, self.epoch(round_))
        with self._lock:
            band = self._band(key, round_)
        judged = band.seen >= self.warmup and direction in SIZED
        sample = Sample(key, math.log(max(rms, 1e-30)), round_, judged)
        if band.seen >= self.warmup:
            off = sample.log_rms - band.mean
            self.observe(direction, math.exp(abs(off)))
            if direction in SIZED and abs(off) > self.log_band:
                raise Refusal(SIZE, f"{direction} hop from stage {stage} has RMS {rms:.3g}, {math.exp(off):.3g}x "
                                    f"the {math.exp(band.mean):.3g} this node sees")
        return sample

    def learn(self, sample: Sample) -> None:
        """An accepted hop moves its band's mean."""
        with self._lock:
            band = self._band(sample.key, sample.round)
            share = 1.0 / (band.seen + 1) if band.seen < self.warmup else self.smoothing  # a plain mean at first
            self._bands[sample.key] = _Band(band.seen + 1, band.mean + share * (sample.log_rms - band.mean),
                                            max(sample.round, band.round))
            direction, stage, epoch = sample.key
            for old in [k for k in self._bands if k[:2] == (direction, stage) and k[2] < epoch - 1]:
                del self._bands[old]  # hops of the previous epoch may still arrive at its turn; older ones not

    def _band(self, key: tuple[str, int, int], round_: int) -> _Band:
        """The band a hop of `round_` is judged by (a fresh one when stale); the caller holds the lock."""
        band = self._bands.get(key)
        if band is None or round_ - band.round > self.stale_rounds:
            return _Band(0, 0.0, round_)
        return band
