"""How a simulated round is executed: which ready step a node runs next, when origins release their
microbatches, and whether a node rests between steps.

`RUNTIME` is what the swarm does, and the simulator's default: `routing.order.queue_key` (loss and backward
first; node/stage/compute.py runs the same key), and each origin starts its microbatches in plan order as
soon as it has a free memory slot (node/stage/origin.py), with no pause between steps.

`SKIPPIPE` mirrors SkipPipe's own simulator (schedulers/com_sym.py in its code) so that plans can be compared
under the rules SkipPipe planned for:
- first come, first served (`routing.order.fcfs_key`), backward steps get no precedence;
- staggered admission: an origin runs one agent per memory slot; its k-th listed microbatch belongs to agent
  k mod A (A = the origin's slots), which releases it at (k mod A) x the origin's forward time, and not
  before the same agent's previous microbatch (k - A) has finished its last backward: an agent keeps one
  microbatch in flight;
- after every step the node stays idle for `SKIPPIPE_IDLE_GAP_S`.
SkipPipe also advances time in 1-s buckets, within which it may serve a later arrival first, releases an
agent's second microbatch 2.5 s after its first and polls a full memory every 0.1 s. Those are artefacts of its
time stepping (the first two are dominated by the agent waiting for its previous microbatch), so this
simulator stays event-driven and exact there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from routing.order import fcfs_key, queue_key

SKIPPIPE_IDLE_GAP_S = 0.13  # SkipPipe's simulator leaves a node idle this long after each step


@dataclass(frozen=True)
class Semantics:
    name: str
    key: Callable[[str, float, int], tuple]  # a ready step's queue key at its node: the smallest runs next
    staggered: bool  # origins release microbatches per agent on a stagger (see the module doc)
    idle_gap_s: float  # a node rests this long after each step


RUNTIME = Semantics("runtime", queue_key, staggered=False, idle_gap_s=0.0)
SKIPPIPE = Semantics("skippipe", fcfs_key, staggered=True, idle_gap_s=SKIPPIPE_IDLE_GAP_S)
SEMANTICS = {s.name: s for s in (RUNTIME, SKIPPIPE)}
