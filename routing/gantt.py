"""Gantt chart of a simulated round: one row per node, forward / loss / backward boxes coloured by microbatch."""

from __future__ import annotations

from pathlib import Path

from routing.plan import Plan
from routing.problem import Problem
from routing.simulator import SimResult


def draw(problem: Problem, plan: Plan, sim: SimResult, out: str | Path, title: str = "") -> None:
    import matplotlib  # lazily: planning must not need a plotting stack

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(14, 0.3 * problem.n + 1.5))
    for m, (nodes, start, end) in enumerate(zip(sim.nodes, sim.start, sim.end)):
        L = (len(nodes) - 1) // 2
        for s, v in enumerate(nodes):
            kind = "fwd" if s < L else "loss" if s == L else "bwd"
            ax.barh(
                v, end[s] - start[s], left=start[s], height=0.8, color=cmap(m % 20),
                hatch="//" if kind == "bwd" else None, edgecolor="black" if kind == "loss" else "none", linewidth=0.5,
            )
    labels = [f"{problem.node_ids[v]} s{plan.stage_of_node[v]}" for v in range(problem.n)]
    ax.set_yticks(range(problem.n), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (solid: forward, hatched: backward, outlined: loss)")
    ax.set_title(title or f"{problem.name}: iteration {sim.makespan:.1f} s")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
