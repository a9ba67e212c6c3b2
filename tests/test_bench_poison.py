"""bench/bench_poison.py's judgement, on synthetic runs: when a kind counts as detected and excluded, and that
every target the report prints can read "missed". (The live swarm it drives is tests/node/test_poisoned_hops.py's,
with more nodes.)"""

from __future__ import annotations

import sys
from types import SimpleNamespace

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "bench"))

import bench_poison  # noqa: E402

BAD, HONEST = "bad-peer", "honest-peer"


def _round(r: int, peers: set[str], averaged: int = 3) -> dict:
    return {"round": r, "plan": {"microbatches": [{"id": 0, "path": [[1, p, ""] for p in sorted(peers)]}]},
            "averaged_with": {"1": averaged}, "loss": 3.0}


class _Run(SimpleNamespace):
    def peer(self, name: str) -> str:
        return {"bad": BAD}[name]

    def rounds(self, name: str = "data") -> dict[int, dict]:
        return self.by_node[name]

    def bans(self) -> list[dict]:
        return self.banned


def test_detection_and_exclusion_count_the_rounds_of_misbehaviour():
    start = bench_poison.FROM_ROUND
    data = {r: _round(r, {BAD, HONEST} if r < start + 2 else {HONEST}) for r in range(20)}
    run = _Run(by_node={"data": data}, banned=[{"peer": BAD, "round": start + 1}, {"peer": HONEST, "round": 3}])
    assert bench_poison.judge_kind(run, "scale-activations") == {"detected_after_rounds": 2,
                                                                "excluded_after_rounds": 3}
    # huge-gradient: caught when the honest replicas averaged without it; it stays in the plans.
    always = {r: _round(r, {BAD, HONEST}) for r in range(20)}
    s1a = {r: _round(r, {BAD, HONEST}, averaged=2 if r >= start + 3 else 3) for r in range(20)}
    run = _Run(by_node={"data": always, "s1a": s1a, "bad": always}, banned=[])
    assert bench_poison.judge_kind(run, "huge-gradient") == {"detected_after_rounds": 4,
                                                            "excluded_after_rounds": None}
    run = _Run(by_node={"data": always}, banned=[])
    assert bench_poison.judge_kind(run, "flip-gradient") == {"detected_after_rounds": None,
                                                            "excluded_after_rounds": None}


def _figures(**changes) -> dict:
    figures = {"kinds": {"scale-activations": {"detected_after_rounds": 1, "excluded_after_rounds": 2,
                                               "loss_ratio_vs_clean": 1.001}},
               "false_accusations": 0, "soak_false_accusations": 0, "soak_rounds": 300, "check_overhead": 0.01,
               "overhead_pairs": [{"on": 0.33, "off": 0.327}], "check_cpu_share": 0.003,
               "check_s": 2.5e-5, "checks_per_round": 38, "misbehave_from": 5, "rounds": 30,
               "soak_hop_size_ratio": {"backward": {"hops": 100, "over_3x": 5, "over_5x": 1, "over_10x": 0}}}
    figures.update(changes)
    return figures


def test_every_target_in_the_report_can_be_missed():
    assert "**missed**" not in bench_poison.render(_figures(), "cmd", 60)
    late = {"scale-activations": {"detected_after_rounds": 6, "excluded_after_rounds": 7, "loss_ratio_vs_clean": 1.0}}
    kept = {"scale-activations": {"detected_after_rounds": 1, "excluded_after_rounds": None,
                                  "loss_ratio_vs_clean": 1.0}}
    harm = {"scale-activations": {"detected_after_rounds": 1, "excluded_after_rounds": 2, "loss_ratio_vs_clean": 1.03}}
    for changes in ({"kinds": late}, {"kinds": kept}, {"kinds": harm}, {"soak_false_accusations": 1},
                    {"check_overhead": 0.06}):
        assert "**missed**" in bench_poison.render(_figures(**changes), "cmd", 60), changes


def test_headroom_reads_the_histograms_cumulative_buckets():
    buckets = {"1.25": 50, "1.5": 70, "2.0": 80, "3.0": 90, "5.0": 97, "10.0": 99, "20.0": 100, "+Inf": 100}
    assert bench_poison.headroom(buckets) == {"hops": 100, "over_3x": 10, "over_5x": 3, "over_10x": 1}
