"""`swarm-node plan`: plan one round for an instance file and print what the simulator predicts."""

from __future__ import annotations

import argparse

from node.errors import UsageError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="plan SkipPipe paths for an instance file and simulate one round")
    p.add_argument("--instance", required=True, help="instance JSON (the format of bench/instances/*.json)")
    p.add_argument("--json", metavar="OUT", help="write the plan in the schedule format")
    p.add_argument("--gantt", metavar="OUT", help="draw the simulated round (.png or .svg)")
    p.add_argument("--seed", type=int, default=0, help="planner seed (default 0); same input and seed, same plan")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from routing.baselines import full_pipeline
    from routing.constraints import check_plan, peak_memory
    from routing.instance_io import load_instance, save_plan
    from routing.plan import stage_visits
    from routing.planner import plan
    from routing.problem import ProblemError
    from routing.simulator import simulate

    if args.gantt and not args.gantt.lower().endswith((".png", ".svg")):
        raise UsageError(f"--gantt must end in .png or .svg, got {args.gantt}")
    try:
        problem = load_instance(args.instance)
    except ProblemError as e:
        raise UsageError(f"{args.instance}: {e}") from None
    result = plan(problem, seed=args.seed)
    broken = check_plan(problem, result)
    if broken:  # a planner bug, not a user error: say so loudly
        raise RuntimeError(f"planner produced an invalid plan: {broken[0]}")
    sim = simulate(problem, result.paths)
    full = full_pipeline(problem, seed=args.seed).predicted_iteration_s
    peaks = peak_memory(problem, sim)
    rows = [
        ("predicted iteration", f"{result.predicted_iteration_s:.2f} s"),
        ("full pipeline (same simulator)", f"{full:.2f} s, ratio {result.predicted_iteration_s / full:.2f}"),
        ("visits per stage", " ".join(str(c) for c in stage_visits(problem, result))),
        ("peak memory per node", " ".join(f"{problem.node_ids[v]}:{p}/{problem.memory[v]}" for v, p in enumerate(peaks))),
        ("collisions", f"{sim.collisions} steps waited, {sim.waiting_s:.1f} s in all"),
        ("planner wall time", f"{result.planner_wall_s:.3f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"plan for {problem.name} ({problem.n} nodes, {len(result.paths)} microbatches, seed {args.seed})")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    try:
        if args.json:
            save_plan(problem, result, args.json)
        if args.gantt:
            from routing.gantt import draw

            draw(problem, result, sim, args.gantt)
    except OSError as e:
        raise UsageError(f"cannot write output: {e}") from None
    return 0
