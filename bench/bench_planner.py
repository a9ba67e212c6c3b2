"""Planner benchmark: our plan vs SkipPipe's plan vs baselines in one simulator, bounds, repair, scaling.

    python bench/bench_planner.py [--instance bench/instances/gcp12-20nodes.json] [--repeats 3] [--quick]
                                  [--scaling 20,50] [--json FIGURES.json]

Every plan is simulated under both execution semantics (`routing/semantics.py`): the runtime's, and
SkipPipe's simulator's.
Prints markdown tables and writes them to bench/results/planner.md, with the Gantt chart of our plan in
bench/results/planner-gantt.png. Timings are medians over --repeats runs in this one process (one core), as
CPU seconds of this process (on a shared machine the wall time also counts other jobs) with the wall time
next to them where it fits.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the goal is stated

import argparse
import json
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
from routing.semantics import SEMANTICS, SKIPPIPE  # noqa: E402
from routing.simulator import lower_bounds, simulate  # noqa: E402
from routing.synthetic import add_node, drop_nodes, generate  # noqa: E402


def timed_cpu(fn, repeats: int):
    """(last result, median wall seconds, median CPU seconds of this process) over `repeats` calls: on a shared
    machine the wall time also counts the time other jobs held the core."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return out, statistics.median(walls), statistics.median(cpus)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def node_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected node counts like 20,50, got {text!r}") from None
    if min(counts) < 6:
        raise argparse.ArgumentTypeError("a synthetic swarm needs at least 6 nodes (one per stage)")
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instance", default=str(REPO / "bench" / "instances" / "gcp12-20nodes.json"))
    ap.add_argument("--skippipe-plan", help="default: <instance>.skippipe-plan.json next to the instance")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="scaling up to 100 nodes only")
    ap.add_argument("--scaling", type=node_counts,
                    help="node counts of the scaling table, e.g. 20,50 (overrides --quick)")
    ap.add_argument("--json", help="also write the side-by-side figures to this JSON file")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    inst = Path(args.instance)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    command = " ".join(["python bench/bench_planner.py", *sys.argv[1:]])
    sections = [f"# Planner benchmark\n\n`{command}`\n\nInstance `{inst.name}`; Python {platform.python_version()}, one process, planning times are "
                f"medians over {args.repeats} runs; load average {load:.1f} at the start (a shared machine).\n"]

    problem = load_instance(inst)
    ours, wall, cpu = timed_cpu(lambda: plan(problem, seed=args.seed), args.repeats)
    assert check_plan(problem, ours) == [], "planner produced an invalid plan"
    ours_sp, wall_sp, cpu_sp = timed_cpu(lambda: plan(problem, seed=args.seed, semantics=SKIPPIPE), args.repeats)
    sp_path = Path(args.skippipe_plan) if args.skippipe_plan else inst.with_name(inst.stem + ".skippipe-plan.json")
    theirs = load_plan(problem, sp_path)
    full, full_wall, full_cpu = timed_cpu(lambda: full_pipeline(problem, seed=args.seed), 1)
    randoms = [random_skip(problem, seed=s) for s in range(5)]
    ref = problem_reference(inst)

    def under(paths_list) -> dict[str, float]:
        """Median seconds per iteration of these plans' paths, per semantics."""
        return {name: statistics.median(simulate(problem, paths, sem).makespan for paths in paths_list)
                for name, sem in SEMANTICS.items()}

    rows = {
        "ours": (under([ours.paths]), f"{cpu:.2f} ({wall:.2f})"),
        "ours, planned for SkipPipe's semantics": (under([ours_sp.paths]), f"{cpu_sp:.2f} ({wall_sp:.2f})"),
        "SkipPipe's plan": (under([theirs.paths]), f"{ref.get('skippipe_scheduler_wall_s_one_core', '?')} (theirs)"),
        "full pipeline": (under([full.paths]), f"{full_cpu:.2f} ({full_wall:.2f})"),
        "random skip (median of 5 seeds)": (under([r.paths for r in randoms]), "-"),
    }
    sp, fp = rows["SkipPipe's plan"][0], rows["full pipeline"][0]
    table_rows = []
    for name, (secs, planning) in rows.items():
        cells = [name]
        for sem in SEMANTICS:
            cells += [f"{secs[sem]:.1f}", f"{secs[sem] / sp[sem]:.2f}", f"{secs[sem] / fp[sem]:.2f}"]
        table_rows.append(cells + [planning])
    sections.append(
        "## Same simulator, both execution semantics\n\n"
        "`runtime`: what the swarm executes (backward and loss first, origins start microbatches in list order "
        "as memory allows). `skippipe`: SkipPipe's simulator's rules (first come first served, staggered agents, "
        f"{SKIPPIPE.idle_gap_s} s idle after each step). See `routing/semantics.py`.\n\n" + table(
            ["scheduler", "runtime s", "vs SkipPipe plan", "vs full pipeline",
             "skippipe s", "vs SkipPipe plan", "vs full pipeline", "planning CPU s (wall)"], table_rows))
    ratio = {sem: rows["ours"][0][sem] / sp[sem] for sem in SEMANTICS}

    def verdict(ok: bool) -> str:
        return "met" if ok else "missed"

    sections.append(
        f"Targets: ours <= 0.75 x SkipPipe's plan under the runtime semantics -> **{ratio['runtime']:.2f}** "
        f"({verdict(ratio['runtime'] <= 0.75)}); under SkipPipe's semantics -> **{ratio['skippipe']:.2f}** "
        f"({verdict(ratio['skippipe'] <= 0.75)}); planning <= 1 s on one core -> **{cpu:.2f} s** CPU "
        f"({verdict(cpu <= 1.0)}; {wall:.2f} s wall at this load).  \n"
        f"SkipPipe's own simulator: {ref.get('skippipe_simulated_iteration_s')} s for its plan, "
        f"{ref.get('full_pipeline_dtfm_simulated_iteration_s')} s full pipeline.")
    summary = {"instance": inst.name, "load_average_1min": load, "planning_cpu_s": cpu, "planning_wall_s": wall, "ratio_vs_skippipe": ratio,
               "iteration_s": {name: secs for name, (secs, _) in rows.items()}}
    t = ours.predicted_iteration_s

    bounds = lower_bounds(problem, ours.paths)
    sections.append("## Lower bounds for our plan\n\n" + table(
        ["bound", "seconds", "plan above it"],
        [[k, f"{v:.1f}", f"{(t / v - 1) * 100:.0f} %"] for k, v in bounds.items()]))

    sections.append("## Repair after churn (20 nodes)\n\n" + repair_table(problem, ours, args))
    sizes = args.scaling or ([20, 50, 100] if args.quick else [20, 50, 100, 500, 1000])
    sections.append("## Scaling (synthetic, seed 0)\n\n" + scaling_table(sizes, args))
    draw(problem, ours, simulate(problem, ours.paths), out_dir / "planner-gantt.png",
         title=f"{problem.name}: our plan, {t:.1f} s per iteration")
    text = "\n\n".join(sections) + "\n"
    (out_dir / "planner.md").write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    print(text)
    return 0


def problem_reference(inst: Path) -> dict:
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
        fixed, _, took = timed_cpu(lambda: repair(problem, base, new, seed=args.seed), args.repeats)
        assert check_plan(new, fixed) == [], name
        fresh, _, fresh_took = timed_cpu(lambda: plan(new, seed=args.seed), 1)
        r, f = fixed.predicted_iteration_s, fresh.predicted_iteration_s
        rows.append([name, f"{took * 1000:.0f}", f"{r:.1f}", f"{fresh_took:.2f}", f"{f:.1f}", f"{(r / f - 1) * 100:+.0f} %"])
    return table(["change", "repair CPU ms", "repaired s", "fresh plan CPU s", "fresh s", "repaired vs fresh"], rows)


def scaling_table(sizes: list[int], args) -> str:
    rows = []
    for n in sizes:
        problem = generate(n, seed=0)
        p, wall, cpu = timed_cpu(lambda: plan(problem, seed=args.seed), args.repeats if n <= 100 else 1)
        bound = max(lower_bounds(problem, p.paths).values())
        rand = random_skip(problem, seed=0).predicted_iteration_s
        rows.append([n, len(p.paths), f"{cpu:.2f} ({wall:.2f})", f"{p.predicted_iteration_s:.1f}",
                     f"{(p.predicted_iteration_s / bound - 1) * 100:.0f} %", f"{rand:.1f}"])
        print(f"  scaled to {n} nodes: {cpu:.2f} s CPU", file=sys.stderr, flush=True)
    return table(["nodes", "microbatches", "planner CPU s (wall)", "iteration s", "above best bound", "random skip s"], rows)


if __name__ == "__main__":
    sys.exit(main())
