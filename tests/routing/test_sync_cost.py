"""The sync phase's cost against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from routing.sync_cost import SyncSetting, sync_seconds, whole_round_seconds

LAT, BW, G = 0.05, 1e6, 4e6  # one-way latency (s), bandwidth (B/s), gradient bytes


def _links(n: int, lat: float = LAT, bw: float = BW) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, n), lat), np.full((n, n), bw)


def _sync(groups, setting: SyncSetting, iteration_s: float = 1.0, n: int = 2, stage_bytes=(G,)) -> float:
    return sync_seconds(groups, list(stage_bytes), *_links(n), setting, iteration_s)


def test_two_replicas_all_to_all_pull_the_whole_gradient_once():
    # one call: the request's latency, the answer's latency and its G bytes
    assert _sync([[0, 1]], SyncSetting("all-to-all")) == pytest.approx(2 * LAT + G / BW)


def test_two_replicas_every_round_move_half_the_gradient_twice():
    assert _sync([[0, 1]], SyncSetting("every-round")) == pytest.approx(2 * (2 * LAT + G / 2 / BW))


def test_three_replicas_every_round_pull_a_third_per_peer():
    assert _sync([[0, 1, 2]], SyncSetting("every-round"), n=3) == pytest.approx(2 * (2 * LAT + G / 3 / BW))
    assert _sync([[0, 1, 2]], SyncSetting("all-to-all"), n=3) == pytest.approx(2 * LAT + G / BW)


def test_outer_hides_a_sync_shorter_than_the_iteration():
    setting = SyncSetting("outer", every=4, wire_ratio=0.25)
    sync = 2 * (2 * LAT + G * 0.25 / 2 / BW)  # 1.2 s every 4 rounds
    assert _sync([[0, 1]], setting, iteration_s=2.0) == 0.0
    assert _sync([[0, 1]], setting, iteration_s=1.0) == pytest.approx((sync - 1.0) / 4)


def test_a_lone_replica_costs_nothing_and_the_slowest_group_sets_the_round():
    assert _sync([[0]], SyncSetting("every-round"), n=1) == 0.0
    assert _sync([], SyncSetting("all-to-all"), n=1) == 0.0
    # stage 0 alone, stage 1 on nodes 1 and 2 with 4 MB, stage 2 on nodes 3 and 4 with 1 MB
    both = _sync([[0], [1, 2], [3, 4]], SyncSetting("all-to-all"), n=5, stage_bytes=(8e6, G, 1e6))
    assert both == pytest.approx(2 * LAT + G / BW)


def test_a_slower_link_makes_the_sync_slower():
    latency, bandwidth = _links(3)
    fast = sync_seconds([[0, 1, 2]], [G], latency, bandwidth, SyncSetting("every-round"), 1.0)
    bandwidth[1, 2] = BW / 4  # only what node 2 pulls from node 1 crosses this direction
    slow = sync_seconds([[0, 1, 2]], [G], latency, bandwidth, SyncSetting("every-round"), 1.0)
    assert slow == pytest.approx(2 * (2 * LAT + G / 3 / (BW / 4))) and slow > fast
    latency, bandwidth = _links(3)
    latency[0, 2] = 0.5  # a slow request from node 0 to node 2
    slower = sync_seconds([[0, 1, 2]], [G], latency, bandwidth, SyncSetting("all-to-all"), 1.0)
    assert slower == pytest.approx(0.5 + LAT + G / BW)


def test_settings_outside_the_runtime_are_refused():
    for bad in (dict(strategy="gossip"), dict(strategy="outer", every=0), dict(strategy="outer", wire_ratio=0.0)):
        with pytest.raises(ValueError):
            SyncSetting(**bad)


def test_the_whole_round_adds_the_parts():
    assert whole_round_seconds(1.5, 0.25, 0.125) == 1.875
