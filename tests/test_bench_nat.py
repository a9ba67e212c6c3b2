"""bench/bench_nat.py: its hop part relays real bytes through a relay process, and its report marks a
missed target as missed. (The swarm part needs the NAT of tests/netns.py and minutes; the NAT tests run the
same relays in a swarm.)"""

from __future__ import annotations

from bench.bench_nat import render, run_hops


def test_hops_cross_a_relay_process_and_are_measured():
    hops = run_hops({1: 2})
    assert set(hops) == {"direct", "relayed", "relayed_default_cap"}
    assert all(hops[name]["1"] > 0 for name in hops), hops


def figures(relayed_16: float, nat_round: float) -> tuple[dict, dict]:
    hops = {name: {"1": 100.0, "16": value} for name, value in
            (("direct", 1000.0), ("relayed", relayed_16), ("relayed_default_cap", 60.0))}
    swarms = {0: {"round_s": 2.0, "nat_visit_share": 0.0, "even_share": 0.0, "rounds": 11},
              1: {"round_s": nat_round, "nat_visit_share": 0.1, "even_share": 0.17, "rounds": 11},
              2: {"round_s": 2.2, "nat_visit_share": 0.2, "even_share": 0.33, "rounds": 11}}
    return hops, swarms


def test_the_report_says_met_or_missed_from_the_figures():
    met = render(*figures(relayed_16=400.0, nat_round=2.4), command="x", slowdown=12, elapsed=60)
    assert "40% -> met" in met and "worst 1.20x -> met" in met
    missed = render(*figures(relayed_16=200.0, nat_round=3.0), command="x", slowdown=12, elapsed=60)
    assert "20% -> MISSED" in missed and "worst 1.50x -> MISSED" in missed
