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
    cpu = {"cpu_s_per_round": 1.5, "busiest_cpu_s_per_round": 0.4}
    swarms = {0: {"round_s": 2.0, "nat_visit_share": 0.0, "even_share": 0.0, "rounds": 11, **cpu},
              1: {"round_s": nat_round, "nat_visit_share": 0.1, "even_share": 0.17, "rounds": 11, **cpu},
              2: {"round_s": 2.2, "nat_visit_share": 0.2, "even_share": 0.33, "rounds": 11, **cpu}}
    as_given = {k: {**r, "round_s": r["round_s"] / 2} for k, r in swarms.items()}
    return hops, {1.0: as_given, 12.0: swarms}


def test_the_report_says_met_or_missed_from_the_figures():
    met = render(*figures(relayed_16=400.0, nat_round=2.4), command="x", elapsed=60)
    assert "40% -> met" in met and "links as given: worst 1.20x -> met" in met and "bandwidth / 12: worst 1.20x -> met" in met
    missed = render(*figures(relayed_16=200.0, nat_round=3.0), command="x", elapsed=60)
    assert "20% -> MISSED" in missed and "bandwidth / 12: worst 1.50x -> MISSED" in missed
    assert "| links as given | 1 | 1.50 | 1.50 |" in missed  # one row per balance and run, each against its own base
