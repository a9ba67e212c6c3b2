"""bench/bench_sync.py's figures, targets and projection inputs, on synthetic events (no swarm)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest

from tests.helpers import REPO


def _bench():
    sys.path.insert(0, str(REPO / "bench"))  # it imports bench_swarm's harness
    spec = importlib.util.spec_from_file_location("bench_sync", REPO / "bench" / "bench_sync.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _round(r: int, sync_bytes: dict, sync_s: dict) -> dict:
    return {"round": r, "sync_bytes": sync_bytes, "sync_s": sync_s}


def test_sync_per_replica_counts_every_round_and_times_after_warmup():
    bench = _bench()
    # Two replicas; an outer-like one that received 800 bytes in round 3 only, of 4 rounds.
    nodes = {"a": [_round(r, {"0": 800 if r == 3 else 0}, {"0": 5.0 if r < 2 else 1.0}) for r in range(4)],
             "b": [_round(r, {"1": 400 if r == 3 else 0}, {"1": 3.0}) for r in range(4)]}
    per_bytes, per_s = bench.sync_per_replica(nodes, first_round=2)
    assert per_bytes == pytest.approx((800 / 4 + 400 / 4) / 2)
    assert per_s == pytest.approx((1.0 + 3.0) / 2)  # round 0 and 1's 5 s are the warm-up


def test_loss_at_interpolates_and_equal_time_uses_the_fastest_run():
    bench = _bench()
    assert bench.loss_at([(1.0, 4.0), (3.0, 2.0)], 2.0) == pytest.approx(3.0)
    assert bench.loss_at([(1.0, 4.0), (3.0, 2.0)], 9.0) == 2.0
    fast = [{"time_s": t, "loss": 3.0} for t in (1.0, 2.0)]
    slow = [{"time_s": t, "loss": y} for t, y in ((2.0, 5.0), (4.0, 1.0))]
    t_end, losses = bench.equal_time({"fast": fast, "slow": slow})
    assert t_end == 2.0 and losses == {"fast": 3.0, "slow": 5.0}


def _report(outer_bytes: float, predicted: float | None, outer_loss: float, projected: float) -> dict:
    run = dict(round_s=1.0, predicted_round_s=predicted, iteration_s=0.9, sync_s=0.1, tokens=1000)
    runs = {"all-to-all": {**run, "sync_bytes_per_replica_round": 2000.0, "final_loss": 2.0},
            "every-round": {**run, "sync_bytes_per_replica_round": 1000.0, "final_loss": 2.0},
            "outer": {**run, "sync_bytes_per_replica_round": outer_bytes, "final_loss": outer_loss}}
    return {"unigram_loss": 3.0, "balances": {"12": runs},
            "projection": {"all-to-all": {"round_s": 30.0, "iteration_s": 10.0},
                           "outer": {"round_s": projected, "iteration_s": 10.0}}}


def test_targets_say_met_and_not_met():
    bench = _bench()
    at_time = {"12": (50.0, {"all-to-all": 2.5, "every-round": 2.4, "outer": 2.2})}
    good = bench.targets(_report(100.0, 1.1, 2.05, 11.0), at_time)
    assert all(ok for ok, _ in good), [line for ok, line in good if not ok]
    assert all(line.endswith("-> met") for _, line in good)
    bad = bench.targets(_report(101.0, None, 2.07, 11.6),
                        {"12": (50.0, {"all-to-all": 2.5, "every-round": 2.1, "outer": 2.2})})
    missed = {line.split(" ")[0] for ok, line in bad if not ok}
    assert missed == {"Prediction:", "Projection:", "Bytes", "Convergence", "Wall-clock"}  # 19.8x, 1.035, 1.16x
    assert all(line.endswith("NOT met") for ok, line in bad if not ok)
    assert [ok for ok, line in bad if line.startswith("Length")] == [True]
    lines = [line for _, line in bench.targets(_report(100.0, 1.3, 2.0, 11.0), at_time)]
    assert any(line.startswith("Prediction") and line.endswith("NOT met") for line in lines)  # 1.0 / 1.3 < 0.8
    over_bar = bench.targets({**_report(100.0, 1.0, 2.3, 11.0), "unigram_loss": 2.9}, at_time)
    assert [ok for ok, line in over_bar if line.startswith("Convergence")] == [False]  # 2.3 > 0.75 x 2.9


def test_stage_params_match_the_built_tiny_model():
    from lm.build import build_stage
    from lm.presets import resolve_model, stage_layers

    bench = _bench()
    spec = resolve_model("tiny", 259)
    config = spec.config
    layers = [len(r) for r in stage_layers(config.num_hidden_layers, 3)]
    built = [sum(p.numel() for p in build_stage(spec, s, 3).parameters()) for s in range(3)]
    assert bench.stage_params(config.hidden_size, config.intermediate_size, layers, 259) == built


def test_projection_model_is_skippipes_gcp_llama():
    bench = _bench()
    model = bench.projection_model(json.loads(bench.INSTANCE.read_text()))
    assert model["intermediate"] == 2816 and bench.llama_intermediate(1280) == 3456  # lm/presets.py's llama-500m
    assert 110e6 < model["params"][0] < 120e6 and all(50e6 < p < 53e6 for p in model["params"][1:])
    assert len(model["params"]) == 6 and model["stage_bytes"] == [4 * p for p in model["params"]]


def test_link_matrices_follow_the_instance_regions():
    bench = _bench()
    inst = json.loads(bench.INSTANCE.read_text())
    latency, bandwidth = bench.link_matrices(inst)
    a, b = inst["nodes"][0]["location"], inst["nodes"][1]["location"]
    link = next(lk for lk in inst["links"] if {lk["a"], lk["b"]} == {a, b})
    assert latency[0, 1] == latency[1, 0] == link["latency_ms"] / 1000
    assert bandwidth[0, 1] == link["bandwidth_GiBps"] * 1024**3
    assert latency[0, 0] == 0 and math.isinf(bandwidth[0, 0])
    same = next(j for j in range(1, len(inst["nodes"])) if inst["nodes"][j]["location"] == a)
    assert latency[0, same] == inst["same_location_link"]["latency_ms"] / 1000


def test_projection_uses_the_simulators_sync_cost():
    pytest.importorskip("routing.sync_cost")
    bench = _bench()
    proj, inputs = bench.projection()
    assert set(proj) == {"all-to-all", "every-round", "outer"}
    assert all(p["round_s"] >= p["iteration_s"] > 0 for p in proj.values())
    assert proj["outer"]["round_s"] <= proj["every-round"]["round_s"] <= proj["all-to-all"]["round_s"]
    assert sorted(v for g in inputs["groups"] for v in g) == list(range(20))


def test_tables_render_and_spacing_skips_the_warmup():
    bench = _bench()
    rounds = [{"time_s": t, "loss": 3.0, "tokens": 100 * (i + 1)} for i, t in enumerate([5.0, 6.0, 8.0, 10.0, 12.0])]
    assert bench.spacing(rounds) == pytest.approx(2.0)  # rounds 2..4: 8 -> 12 s in two steps
    report = _report(100.0, None, 2.0, 11.0)
    table = bench.balance_table(report["balances"]["12"], {name: rounds for name in report["balances"]["12"]})
    assert "| outer | 1.000 | - | - | 0.900 | 1.11 | 2.000 | 0.100 | 100 | 20.0x fewer | 1,000 | 2.0000 |" in table
    inputs = {**bench.projection_model(json.loads(bench.INSTANCE.read_text())), "groups": [[0, 1]], "iteration_s": 10.0}
    assert "| outer | 11.0 | 10.0 | 1.10 |" in bench.projection_table(report["projection"], inputs)


def test_timed_out_names_rounds_near_the_round_timeout():
    bench = _bench()
    rounds = [{"round": r, "round_s": s} for r, s in enumerate([1.0, 2.0, 119.5, 107.9])]
    assert bench.timed_out(rounds, 120) == [2]
