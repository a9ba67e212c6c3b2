"""SkipPipe path scheduling: a pure library (no network, no torch). See docs/routing.md.

The daemon plans from live measurements and repairs when the swarm changes:

    problem = from_live(nodes, links, stages=S, visits=L, activation_bytes=B, microbatches_per_data_node=M, ...)
    result = plan(problem, seed=round_number)
    schedule = plan_to_dict(problem, result)          # the shared schedule format, node ids as given
    result2 = repair(problem, result, new_problem)     # after nodes left or joined
    simulate(problem, result.paths, SKIPPIPE)          # the same paths under SkipPipe's simulator's rules
"""

from routing.constraints import check_plan
from routing.instance_io import load_instance, plan_from_dict, plan_to_dict
from routing.plan import Plan, replica_weights, stage_visits
from routing.planner import cover_replicas, plan
from routing.problem import LiveLink, LiveNode, Problem, ProblemError, from_live
from routing.repair import repair
from routing.semantics import RUNTIME, SKIPPIPE, Semantics
from routing.simulator import simulate

__all__ = [
    "LiveLink", "LiveNode", "Plan", "Problem", "ProblemError", "RUNTIME", "SKIPPIPE", "Semantics", "check_plan",
    "cover_replicas", "from_live", "load_instance",
    "plan", "plan_from_dict", "plan_to_dict", "repair", "replica_weights", "simulate", "stage_visits",
]
