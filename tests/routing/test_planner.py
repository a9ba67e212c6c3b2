"""Planner quality and determinism, and repair after churn."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from routing.baselines import full_pipeline, random_skip
from routing.constraints import check_plan
from routing.instance_io import load_instance, load_plan
from routing.planner import plan
from routing.repair import repair
from routing.semantics import RUNTIME, SKIPPIPE
from routing.simulator import simulate
from routing.synthetic import add_node, drop_nodes, generate

GCP = Path(__file__).resolve().parents[2] / "bench" / "instances" / "gcp12-20nodes.json"


def test_same_input_and_seed_give_the_same_plan():
    problem = generate(20, seed=7)
    a, b = plan(problem, seed=4, evals=60), plan(problem, seed=4, evals=60)
    assert a.paths == b.paths and a.stage_of_node == b.stage_of_node
    assert a.predicted_iteration_s == b.predicted_iteration_s


def test_search_improves_on_its_start_and_beats_baselines():
    problem = generate(20, seed=11)
    start = plan(problem, seed=0, evals=0)
    ours = plan(problem, seed=0, evals=300)
    assert ours.predicted_iteration_s <= start.predicted_iteration_s
    assert ours.predicted_iteration_s < random_skip(problem, seed=0).predicted_iteration_s
    assert ours.predicted_iteration_s < full_pipeline(problem, seed=0, evals=50).predicted_iteration_s


def test_gcp_plan_beats_skippipes_plan_under_both_semantics():
    # The goal (<= 0.75 x SkipPipe's plan under both) is missed: about 0.84 and 0.89 (bench/results/planner.md).
    problem = load_instance(GCP)
    theirs = load_plan(problem, GCP.with_name("gcp12-20nodes.skippipe-plan.json")).paths
    ours = plan(problem, seed=0)
    assert check_plan(problem, ours) == []
    assert ours.predicted_iteration_s == simulate(problem, ours.paths, RUNTIME).makespan  # planned for the runtime
    for semantics in (RUNTIME, SKIPPIPE):
        assert simulate(problem, ours.paths, semantics).makespan < simulate(problem, theirs, semantics).makespan
    for_skippipe = plan(problem, seed=0, semantics=SKIPPIPE)
    assert for_skippipe.predicted_iteration_s == simulate(problem, for_skippipe.paths, SKIPPIPE).makespan


def _churn(problem, p):
    stage_node = next(i for v, i in enumerate(problem.node_ids) if p.stage_of_node[v] == 2)
    data_node = next(i for v, i in enumerate(problem.node_ids) if p.stage_of_node[v] == 0)
    row = problem.link_s[0].copy()
    row[0] = row[row > 0].min()
    return [
        drop_nodes(problem, p, [stage_node]),
        drop_nodes(problem, p, [data_node]),
        add_node(problem, p, 10_000, 1.5, 3, row, 1),
        add_node(problem, p, 10_001, 1.5, 3, row, 0),
    ]


def test_repair_keeps_rules_and_untouched_paths():
    problem = generate(20, seed=3)
    p = plan(problem, seed=0, evals=100)
    for new in _churn(problem, p):
        started = time.perf_counter()
        fixed = repair(problem, p, new)
        took = time.perf_counter() - started
        assert check_plan(new, fixed) == [], new.name
        assert took < 0.5  # 100 ms on a quiet core (see the bench); slack for a busy test machine
        # Repair is incremental: most microbatch ids survive with the same origin.
        old_origin = {mb: problem.node_ids[path[0]] for mb, path in zip(p.mb_ids, p.paths)}
        kept = [mb for mb, path in zip(fixed.mb_ids, fixed.paths) if old_origin.get(mb) == new.node_ids[path[0]]]
        assert len(kept) >= len(p.paths) - new.microbatches_per_data_node


def test_repair_refills_a_stage_that_lost_its_last_replica():
    problem = generate(12, seed=1, stages=4, visits=3)
    p = plan(problem, seed=0, evals=20)
    gone = [i for v, i in enumerate(problem.node_ids) if p.stage_of_node[v] == 1]
    # The swarm still wants every stage: data nodes hand one replica over to stage 1.
    wanted = [p.stage_of_node.count(s) for s in range(problem.stages)]
    wanted[0] -= 1
    target = drop_nodes(problem, p, gone, stage_replicas=tuple(wanted[:1] + [1] + wanted[2:]))
    fixed = repair(problem, p, target)
    assert check_plan(target, fixed) == []
    assert fixed.stage_of_node.count(1) == 1 and np.isfinite(fixed.predicted_iteration_s)


def test_cover_replicas_puts_every_replica_in_the_round():
    from routing import LiveLink, LiveNode, cover_replicas, from_live

    # Stage 1 has a fast replica and one 50x slower: the search leaves the slow one idle. Its link to d0 is
    # slow too, so the hop to move is one of d1's microbatches.
    nodes = [LiveNode("d0", 0.01, 8, 0), LiveNode("d1", 0.01, 8, 0), LiveNode("fast", 0.01, 8, 1),
             LiveNode("slow", 0.5, 8, 1), LiveNode("s2", 0.01, 8, 2)]
    problem = from_live(nodes, [LiveLink("d0", "slow", 2.0, 1e9)], stages=3, visits=3, activation_bytes=1000,
                        microbatches_per_data_node=4, missing_link_s=0.001, max_swaps=0)
    searched = plan(problem, seed=0, evals=100)
    slow = problem.node_ids.index("slow")
    assert not any(slow in p for p in searched.paths)  # the premise: the search alone leaves it out
    covered = cover_replicas(problem, searched)
    assert sum(p.count(slow) for p in covered.paths) == 1  # one hop moved, from the busy twin
    assert next(p for p in covered.paths if slow in p)[0] == problem.node_ids.index("d1")
    assert covered.mb_ids == searched.mb_ids
    assert check_plan(problem, covered) == []
    assert covered.predicted_iteration_s == simulate(problem, covered.paths).makespan
    assert cover_replicas(problem, covered) == covered  # nothing left to cover
