"""The order a node runs the steps waiting for it: one policy, used by the simulator and by the executor.

A node runs one step at a time. When several are ready, loss and backward steps go first (they finish
microbatches and free memory), then forward steps; within a kind, the step that became ready first runs
first, ties broken by microbatch id. A forward step also needs a free memory slot on its node; a forward
that has none waits without holding up the steps behind it (the executor parks it before submitting it).

`fcfs_key` is the other policy the simulator knows, for comparing with SkipPipe's simulator
(`routing.semantics`): first come, first served, whatever the kind. The runtime never uses it.
"""

from __future__ import annotations

FORWARD, LOSS, BACKWARD = "forward", "loss", "backward"  # the head + loss step runs at the origin


def step_kind(step: int, visits: int) -> str:
    """The kind of step `step` (0..2L) of a microbatch visiting `visits` stages."""
    return FORWARD if step < visits else LOSS if step == visits else BACKWARD


def queue_key(kind: str, ready: float, microbatch: int) -> tuple[int, float, int]:
    """Sort key of a ready step at its node: the smallest runs next. The runtime's policy."""
    return (1 if kind == FORWARD else 0, ready, microbatch)


def fcfs_key(kind: str, ready: float, microbatch: int) -> tuple[int, float, int]:
    """First come, first served: the step that became ready first runs next, whatever its kind."""
    return (0, ready, microbatch)


def needs_slot(kind: str) -> bool:
    """A forward step holds a memory slot from its start until that node's backward of the microbatch ends."""
    return kind == FORWARD
