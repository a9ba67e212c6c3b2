"""bench/bench_swarm.py: the harness other benches import (its pieces, without a swarm), its unigram reference,
its report on synthetic runs, and a tiny bench end to end on a real swarm."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from collections import Counter

import pytest

from node.dataplane.link_emulation import LinkEmulator
from tests.helpers import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("bench_swarm", REPO / "bench" / "bench_swarm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_emulation_places_endpoints_in_the_instance_regions(tmp_path):
    bench = _bench()
    endpoints = [f"127.0.0.1:{4000 + i}" for i in range(8)]
    path = bench.emulation_file(tmp_path / "links.json", endpoints)
    emulator = LinkEmulator.load(path)
    instance = json.loads(bench.INSTANCE.read_text())
    assert [emulator.regions[e] for e in endpoints] == [n["location"] for n in instance["nodes"][:8]]
    emulator.bind(endpoints[0])
    link = next(lk for lk in instance["links"] if {lk["a"], lk["b"]} == {emulator.regions[endpoints[0]],
                                                                        emulator.regions[endpoints[1]]})
    assert emulator.link_to(endpoints[1]).latency_s == link["latency_ms"] / 1000
    slowed = LinkEmulator.load(bench.emulation_file(tmp_path / "slow.json", endpoints, slowdown=12))
    slowed.bind(endpoints[0])
    assert slowed.link_to(endpoints[1]).bandwidth_Bps * 12 == pytest.approx(emulator.link_to(endpoints[1]).bandwidth_Bps)
    assert slowed.link_to(endpoints[1]).latency_s == emulator.link_to(endpoints[1]).latency_s
    assert bench.half_of_nonzero_stages(6) == {2, 4} and bench.half_of_nonzero_stages(4) == {2}


def test_unigram_cross_entropy_is_add_one_smoothed_in_nats():
    bench = _bench()
    counts = Counter({0: 6, 1: 2})  # 8 tokens, vocabulary of 4: p(0) = 7/12, p(3) = 1/12
    assert bench.unigram_cross_entropy(counts, [0, 3], 4) == pytest.approx(-(math.log(7 / 12) + math.log(1 / 12)) / 2)


def test_unigram_loss_scores_the_tokens_evaluate_reads(tmp_path):
    bench = _bench()
    train, held = tmp_path / "train.txt", tmp_path / "held.txt"
    train.write_text("ab" * 100)
    held.write_text("a" * 10)
    # Windows of 4: two windows of "aaaa"; the first token of each is not scored, so 6 "a"s are.
    p_a = (100 + 1) / (200 + 259)
    assert bench.unigram_loss(train, held, seq_len=4, max_sequences=8) == pytest.approx(-math.log(p_a))


@pytest.mark.slow
def test_a_tiny_bench_runs_end_to_end(tmp_path):
    """Both configurations train on a real swarm; the figures come from the runs and move with the work."""
    out, figures = tmp_path / "results", tmp_path / "swarm.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "bench_swarm.py"), "--rounds", "4", "--seeds", "1",
                             "--link-slowdown", "1", "--out", str(out), "--json", str(figures),
                             "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(figures.read_text())
    assert data["seeds"] == [0] and list(data["balances"]) == ["1"]
    assert 2.5 < data["unigram_loss"] < 4  # bytes of Python source
    for name in ("full", "skip"):
        f = data[name]
        assert f["tokens"] == 4 * 2 * 4 * 4 * 64 and f["failed"] == 0  # 4 rounds of 2 data nodes' microbatches
        assert f["heldout_loss_ci"] is None and math.isfinite(f["heldout_loss"])
        assert f["ppl"] == pytest.approx(math.exp(f["heldout_loss"]))
        assert 0 < f["independent_iteration_s"] and 0 < f["predicted_iteration_s"] and 0 < f["iteration_s"]
        assert len(f["cpu_s_per_round"]) == 8 and all(s > 0 for s in f["cpu_s_per_round"].values())
    # The independent prediction (static links, start-up probes) is of the order of what ran. Not compared across
    # the two runs: each has its own probes, and one probe slowed by the shared cores at start-up moved skip's
    # above full's once (2.23 vs 2.17 s, with skip measured at 1.54 s against full's 2.56 s).
    for name in ("full", "skip"):
        assert 1 / 3 < data[name]["iteration_s"] / data[name]["independent_iteration_s"] < 3, data[name]
    assert data["skip"]["iteration_s"] < data["full"]["iteration_s"]  # 4 of 6 stages: measured, it is shorter
    assert data["learned"] is False  # four steps teach a model little: the bench says so, and judges nothing
    report = (out / "swarm.md").read_text()
    assert "NOT reached" in report and "Convergence" not in report and (out / "swarm.png").is_file()
    # Four steps moved the model off its random init, but not below the unigram reference
    assert data["full"]["heldout_loss"] < data["random_init"]["heldout_loss"]
    assert data["full"]["heldout_loss"] > data["unigram_loss"] * 0.75


def _synthetic(bench, name: str, seed: int, executed: float, loss: float, ppl: float, ppl_omit: float, rounds: int = 6):
    """A ConfigResult as run_config returns it, without a swarm: steady rounds, 1 CPU s per round per process."""
    r = bench.ConfigResult(name, 6 if name == "full" else 4, ppl=ppl, ppl_omit=ppl_omit)
    r.rounds = [{"round": k, "tokens": 2048 * (k + 1), "loss": loss + (rounds - k) * 0.1, "failed": 0,
                 "executed_s": executed, "round_s": executed + 1, "predicted_s": executed / 1.1,
                 "time_s": (k + 1) * (executed + 1) + seed} for k in range(rounds)]
    r.node_events = {f"node{i}": [{"event": "round", "round": k, "cpu_s": 10.0 + k} for k in range(rounds)]
                     for i in range(8)}
    return r


def test_report_judges_learning_first_and_every_target_at_its_interval(tmp_path):
    bench = _bench()
    runs = {1.0: {"full": [_synthetic(bench, "full", s, 2.0, 2.0, math.exp(2.1 + s / 100), math.exp(2.6)) for s in range(3)],
                  "skip": [_synthetic(bench, "skip", s, 1.0, 2.0, math.exp(2.12 + s / 100), math.exp(2.2)) for s in range(3)]},
            12.0: {"full": [_synthetic(bench, "full", s, 4.0 + s / 10, 3.0, 0, 0) for s in range(3)],
                   "skip": [_synthetic(bench, "skip", s, 2.0, 3.0, 0, 0) for s in range(3)]}}
    summary = bench.summarize(runs, "12", 3.0, [250.0] * 3, [251.0] * 3, seeds=[0, 1, 2], rounds=6, timing_rounds=6)
    assert summary["learned"] and summary["seeds"] == [0, 1, 2] and set(summary["balances"]) == {"1", "12"}
    full, skip = summary["balances"]["1"]["full"], summary["balances"]["1"]["skip"]
    assert full["heldout_loss"] == pytest.approx(2.11) and full["heldout_loss_ci"][0] < 2.11 < full["heldout_loss_ci"][1]
    assert skip["vs_full"] == pytest.approx(0.5) and summary["balances"]["12"]["skip"]["vs_full"] < 0.5
    assert full["cpu_s_per_round"] == {f"node{i}": pytest.approx(1.0) for i in range(8)}
    assert full["cpu_s_per_round_total"] == pytest.approx(8.0) and full["tokens"] == 6 * 2048
    assert summary["skip"]["iteration_s"] == 2.0  # the default balance leads
    text = bench.render(summary, {2, 4})
    assert "reached, so the learning targets below are judged" in text
    assert "- Speed, skip <= 0.6x full, links as given: 0.50 -> met (one seed" not in text  # three seeds: an interval
    assert "skip <= 0.6x full, bandwidth / 12" in text and "Convergence" in text
    # full-trained loses 0.5 nats omitting stages; skip-trained 0.08: one passes the omission target, one must not
    assert "skip-trained 1." in text and "-> met;" in text
    summary = bench.summarize(runs, "12", 2.5, [250.0] * 3, [251.0] * 3, seeds=[0, 1, 2], rounds=6, timing_rounds=6)
    text = bench.render(summary, {2, 4})  # 2.11 is not 25% below 2.5: nothing is judged
    assert not summary["learned"] and "NOT reached" in text and "Convergence" not in text
