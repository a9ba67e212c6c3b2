"""Planner benchmark: our plan vs SkipPipe's plan vs baselines in one simulator, bounds, repair, scaling.

    python bench/bench_planner.py [--instance bench/instances/gcp12-20nodes.json] [--repeats 3] [--quick]

Prints markdown tables and writes them to bench/results/planner.md, with the Gantt chart of our plan in
bench/results/planner-gantt.png. Timings are medians over --repeats runs in this one process (one core).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the goal is stated

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from routing.baselines import full_pipeline, random_skip  # noqa: E402
from routing.constraints import check_plan  # noqa: E402
from routing.gantt import draw  # noqa: E402
from routing.instance_io import load_instance, load_plan  # noqa: E402
from routing.planner import plan  # noqa: E402
from routing.repair import repair  # noqa: E402
from routing.simulator import lower_bounds, simulate  # noqa: E402
from routing.synthetic import add_node, drop_nodes, generate  # noqa: E402


def timed(fn, repeats: int):
    """(last result, median seconds) over `repeats` calls."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instance", default=str(REPO / "bench" / "instances" / "gcp12-20nodes.json"))
    ap.add_argument("--skippipe-plan", help="default: <instance>.skippipe-plan.json next to the instance")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="scaling up to 100 nodes only")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    inst = Path(args.instance)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = [f"# Planner benchmark\n\nInstance `{inst.name}`; Python {platform.python_version()}, one process, "
                f"medians over {args.repeats} runs.\n"]

    problem = load_instance(inst)
    ours, wall = timed(lambda: plan(problem, seed=args.seed), args.repeats)
    assert check_plan(problem, ours) == [], "planner produced an invalid plan"
    sp_path = Path(args.skippipe_plan) if args.skippipe_plan else inst.with_name(inst.stem + ".skippipe-plan.json")
    skippipe = simulate(problem, load_plan(problem, sp_path).paths).makespan
    full, full_wall = timed(lambda: full_pipeline(problem, seed=args.seed), 1)
    rand = statistics.median(random_skip(problem, seed=s).predicted_iteration_s for s in range(5))
    ref = problem_reference(inst)
    t = ours.predicted_iteration_s
    rows = [
        ["ours", f"{t:.1f}", f"{t / skippipe:.2f}", f"{t / full.predicted_iteration_s:.2f}", f"{wall:.3f}"],
        ["SkipPipe's plan", f"{skippipe:.1f}", "1.00", f"{skippipe / full.predicted_iteration_s:.2f}",
         f"{ref.get('skippipe_scheduler_wall_s_one_core', '?')} (theirs)"],
        ["full pipeline", f"{full.predicted_iteration_s:.1f}", f"{full.predicted_iteration_s / skippipe:.2f}", "1.00",
         f"{full_wall:.3f}"],
        ["random skip (median of 5 seeds)", f"{rand:.1f}", f"{rand / skippipe:.2f}",
         f"{rand / full.predicted_iteration_s:.2f}", "-"],
    ]
    sections.append("## Same simulator, side by side\n\n" + table(
        ["scheduler", "iteration s", "vs SkipPipe plan", "vs full pipeline", "planning s"], rows))
    sections.append(
        f"Goal: ours <= 0.75 x SkipPipe's plan -> **{t / skippipe:.2f}**; planning <= 1 s -> **{wall:.3f} s**.  \n"
        f"SkipPipe's own simulator: {ref.get('skippipe_simulated_iteration_s')} s for its plan, "
        f"{ref.get('full_pipeline_dtfm_simulated_iteration_s')} s full pipeline.")

    bounds = lower_bounds(problem, ours.paths)
    sections.append("## Lower bounds for our plan\n\n" + table(
        ["bound", "seconds", "plan above it"],
        [[k, f"{v:.1f}", f"{(t / v - 1) * 100:.0f} %"] for k, v in bounds.items()]))

    sections.append("## Repair after churn (20 nodes)\n\n" + repair_table(problem, ours, args))
    sections.append("## Scaling (synthetic, seed 0)\n\n" + scaling_table([20, 50, 100] if args.quick else
                                                                         [20, 50, 100, 500, 1000], args))
    draw(problem, ours, simulate(problem, ours.paths), out_dir / "planner-gantt.png",
         title=f"{problem.name}: our plan, {t:.1f} s per iteration")
    text = "\n\n".join(sections) + "\n"
    (out_dir / "planner.md").write_text(text)
    print(text)
    return 0


def problem_reference(inst: Path) -> dict:
    import json

    return json.loads(inst.read_text()).get("reference", {})


def repair_table(problem, base, args) -> str:
    by_stage = {s: [problem.node_ids[v] for v, x in enumerate(base.stage_of_node) if x == s] for s in range(problem.stages)}
    near = problem.index(by_stage[1][0])
    row = problem.link_s[near].copy()
    row[near] = row[row > 0].min()
    cases = [
        (f"stage-1 node {by_stage[1][0]} leaves", drop_nodes(problem, base, [by_stage[1][0]])),
        (f"data node {by_stage[0][0]} leaves", drop_nodes(problem, base, [by_stage[0][0]])),
        ("two stage nodes leave", drop_nodes(problem, base, [by_stage[2][0], by_stage[4][1]])),
        (f"stage-3 node joins next to {by_stage[1][0]}", add_node(problem, base, "new", 1.76, 3, row, 3)),
        (f"data node joins next to {by_stage[1][0]}", add_node(problem, base, "new", 1.76, 3, row, 0)),
    ]
    rows = []
    for name, new in cases:
        fixed, took = timed(lambda: repair(problem, base, new, seed=args.seed), args.repeats)
        assert check_plan(new, fixed) == [], name
        fresh, fresh_took = timed(lambda: plan(new, seed=args.seed), 1)
        r, f = fixed.predicted_iteration_s, fresh.predicted_iteration_s
        rows.append([name, f"{took * 1000:.0f}", f"{r:.1f}", f"{fresh_took:.2f}", f"{f:.1f}", f"{(r / f - 1) * 100:+.0f} %"])
    return table(["change", "repair ms", "repaired s", "fresh plan s (wall)", "fresh s", "repaired vs fresh"], rows)


def scaling_table(sizes: list[int], args) -> str:
    rows = []
    for n in sizes:
        problem = generate(n, seed=0)
        p, wall = timed(lambda: plan(problem, seed=args.seed), args.repeats if n <= 100 else 1)
        bound = max(lower_bounds(problem, p.paths).values())
        rand = random_skip(problem, seed=0).predicted_iteration_s
        rows.append([n, len(p.paths), f"{wall:.2f}", f"{p.predicted_iteration_s:.1f}",
                     f"{(p.predicted_iteration_s / bound - 1) * 100:.0f} %", f"{rand:.1f}"])
        print(f"  scaled to {n} nodes: {wall:.2f} s", file=sys.stderr, flush=True)
    return table(["nodes", "microbatches", "planner s", "iteration s", "above best bound", "random skip s"], rows)


if __name__ == "__main__":
    sys.exit(main())
