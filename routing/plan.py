"""A plan: the stage each node hosts and the path each microbatch takes, plus what the simulator predicted."""

from __future__ import annotations

from dataclasses import dataclass

from routing.problem import Problem


@dataclass(frozen=True)
class Plan:
    stage_of_node: tuple[int, ...]  # by node index
    paths: tuple[tuple[int, ...], ...]  # node indices, the origin first and last, L + 1 entries
    mb_ids: tuple[int, ...]
    predicted_iteration_s: float = 0.0
    predicted_end_s: tuple[float, ...] = ()  # when each microbatch's last backward ends
    planner_wall_s: float = 0.0

    def stage_path(self, m: int) -> tuple[int, ...]:
        return tuple(self.stage_of_node[v] for v in self.paths[m][:-1])


def stage_visits(problem: Problem, plan: Plan) -> list[int]:
    """Microbatches that pass through each stage this round (stage 0 sees every microbatch)."""
    counts = [0] * problem.stages
    for m in range(len(plan.paths)):
        for s in plan.stage_path(m):
            counts[s] += 1
    return counts


def replica_weights(problem: Problem, plan: Plan) -> dict[int, float]:
    """Each node's share of its stage's microbatches: the weight its gradients get when its replicas average."""
    per_node = [0] * problem.n
    for path in plan.paths:
        for v in path[:-1]:
            per_node[v] += 1
    totals = stage_visits(problem, plan)
    return {v: per_node[v] / totals[s] if totals[s] else 0.0 for v, s in enumerate(plan.stage_of_node)}
