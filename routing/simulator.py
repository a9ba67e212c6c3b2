"""Discrete-event simulation of one training round under the instance's cost model.

Each microbatch with path [o, n1, .., n_{L-1}, o] runs 2L + 1 steps:
  steps 0..L-1      forward on o, n1, .., n_{L-1}          (w of that node)
  step  L           head + loss on o                       (0.25 w of o)
  steps L+1..2L     backward on n_{L-1}, .., n1, o          (1.5 w), retracing the forward path
Between consecutive steps on different nodes the message pays link_s. A node runs one step at a time; a
forward step needs a free memory slot on its node, held until that node's backward step of the same
microbatch ends; while it waits for one, other steps may run. Links are not contended. A plan whose memory
waits form a cycle deadlocks: the result says so and its makespan is infinite.

How the round executes is a `routing.semantics.Semantics`: by default the runtime's (`routing.order`'s
policy, the one node/stage/compute.py runs; origins start microbatches in list order as memory allows),
or SkipPipe's simulator's (first come first served, staggered agents, an idle gap after each step).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from routing.order import needs_slot, step_kind
from routing.problem import Problem
from routing.semantics import RUNTIME, Semantics

EPS = 1e-9


@dataclass
class SimResult:
    makespan: float  # seconds until the last backward ends: the iteration time
    start: list[list[float]]  # [microbatch][step]
    end: list[list[float]]
    ready: list[list[float]]
    nodes: list[list[int]]  # [microbatch][step] -> node index
    busy: np.ndarray  # (N,) seconds computing
    wait: np.ndarray  # (N,) seconds that ready steps waited at the node (for compute or memory)
    collisions: int  # steps that had to wait
    deadlock: bool

    @property
    def waiting_s(self) -> float:
        return float(self.wait.sum())

    @property
    def idle(self) -> np.ndarray:
        return self.makespan - self.busy

    def mb_end(self) -> list[float]:
        return [e[-1] for e in self.end]


def _step_plan(problem: Problem, path: tuple[int, ...]) -> tuple[list[int], list[float], list[float]]:
    """Nodes, durations and incoming link delays of a microbatch's 2L + 1 steps (cached per path)."""
    cache = problem.step_cache
    if path in cache:
        return cache[path]
    fwd, bwd, loss, link = problem.py_costs
    hops = list(path[:-1])
    nodes = hops + [hops[0]] + hops[::-1]
    dur = [fwd[v] for v in hops] + [loss[hops[0]]] + [bwd[v] for v in hops[::-1]]
    delay = [0.0] + [link[nodes[t - 1]][nodes[t]] for t in range(1, len(nodes))]
    cache[path] = nodes, dur, delay
    return cache[path]


def release(problem: Problem, paths: tuple[tuple[int, ...], ...] | list) -> tuple[list[float], list[int]]:
    """Staggered admission (`routing.semantics`): per microbatch, its release time and the microbatch of the
    same agent that must finish first (-1 for none). An origin's k-th listed microbatch is agent k mod A's."""
    fwd = problem.py_costs[0]
    mem = problem.memory.tolist()
    rel, prev = [0.0] * len(paths), [-1] * len(paths)
    listed: dict[int, list[int]] = {}
    for m, path in enumerate(paths):
        o = path[0]
        mine = listed.setdefault(o, [])
        k, agents = len(mine), mem[o]
        rel[m] = (k % agents) * fwd[o]
        prev[m] = mine[k - agents] if k >= agents else -1
        mine.append(m)
    return rel, prev


def simulate(problem: Problem, paths: tuple[tuple[int, ...], ...] | list, semantics: Semantics = RUNTIME) -> SimResult:
    """One round of these paths (listed in admission order) under `semantics` (the runtime's by default)."""
    n_mb = len(paths)
    L = len(paths[0]) - 1 if n_mb else 0
    last = 2 * L
    mem = problem.memory.tolist()
    plans = [_step_plan(problem, tuple(p)) for p in paths]
    nodes = [p[0] for p in plans]
    durs = [p[1] for p in plans]
    delays = [p[2] for p in plans]
    start = [[math.nan] * (last + 1) for _ in range(n_mb)]
    end = [[math.nan] * (last + 1) for _ in range(n_mb)]
    ready = [[math.nan] * (last + 1) for _ in range(n_mb)]
    n = problem.n
    busy, wait = [0.0] * n, [0.0] * n
    running = [False] * n
    used = [0] * n
    # Per node, ready steps as (queue key, mb, step), smallest runs next: forwards (they need a memory slot)
    # apart from the rest, so that a forward without a slot holds up nothing behind it.
    fwd_q: list[list] = [[] for _ in range(n)]
    rest_q: list[list] = [[] for _ in range(n)]
    kinds = [step_kind(s, L) for s in range(last + 1)]
    slot = [needs_slot(k) for k in kinds]
    key, gap = semantics.key, semantics.idle_gap_s
    if semantics.staggered:
        rel, prev = release(problem, paths)
    else:
        rel, prev = [0.0] * n_mb, [-1] * n_mb
    after = {p: m for m, p in enumerate(prev) if p >= 0}  # the agent's next microbatch, once this one is done
    # (time, kind, mb, step); kind 0 = a step's input arrives, 1 = a step ends, 2 = node mb rests no more
    events = [(rel[m], 0, m, 0) for m in range(n_mb) if prev[m] < 0]
    heapq.heapify(events)
    push, pop = heapq.heappush, heapq.heappop
    collisions, done = 0, 0
    touched: list[int] = []
    while events:
        t, kind, m, s = pop(events)
        if kind == 2:
            running[m] = False
            touched.append(m)
        else:
            v = nodes[m][s]
            if kind == 0:
                ready[m][s] = t
                push(fwd_q[v] if slot[s] else rest_q[v], (key(kinds[s], t, m), m, s))
            else:
                if gap > 0:
                    push(events, (t + gap, 2, v, -1))
                else:
                    running[v] = False
                if s > L:
                    used[v] -= 1
                if s < last:
                    push(events, (t + delays[m][s + 1], 0, m, s + 1))
                else:
                    done += 1
                    if m in after:
                        nxt = after[m]
                        push(events, (max(t, rel[nxt]), 0, nxt, 0))
            touched.append(v)
        if events and events[0][0] <= t + EPS:
            continue  # decide only once everything that happens at time t is known
        for u in sorted(set(touched)) if len(touched) > 1 else touched:
            if running[u]:
                continue
            q = rest_q[u]
            if fwd_q[u] and used[u] < mem[u] and (not q or fwd_q[u][0] < q[0]):
                q = fwd_q[u]
                used[u] += 1
            if not q:
                continue
            _, k, st = pop(q)
            r = ready[k][st]
            running[u] = True
            start[k][st] = t
            if t - r > EPS:
                collisions += 1
                wait[u] += t - r
            d = durs[k][st]
            busy[u] += d
            end[k][st] = t + d
            push(events, (t + d, 1, k, st))
        touched.clear()
    makespan = max((e[-1] for e in end), default=0.0) if done == n_mb else math.inf
    return SimResult(
        makespan=makespan,
        start=start,
        end=end,
        ready=ready,
        nodes=nodes,
        busy=np.array(busy),
        wait=np.array(wait),
        collisions=collisions,
        deadlock=done < n_mb,
    )


def lower_bounds(problem: Problem, paths: tuple[tuple[int, ...], ...] | list) -> dict[str, float]:
    """Bounds no schedule of these paths can beat.

    work:     the busiest node's total compute.
    path:     the longest microbatch's critical path (all its steps and links, no waiting).
    memory:   per node, the slot-seconds its microbatches need at the least (each holds a slot from its forward
              start to its backward end), divided by its slots.
    """
    work = np.zeros(problem.n)
    slot_s = np.zeros(problem.n)
    longest = 0.0
    for p in paths:
        nodes, dur, delay = _step_plan(problem, p)
        for v, d in zip(nodes, dur):
            work[v] += d
        longest = max(longest, sum(dur) + sum(delay))
        L = len(p) - 1
        for k in range(L):  # the slot at hop k spans steps k .. 2L - k
            slot_s[nodes[k]] += sum(dur[k : 2 * L - k + 1]) + sum(delay[k + 1 : 2 * L - k + 1])
    return {
        "work": float(work.max()),
        "path": longest,
        "memory": float((slot_s / problem.memory).max()),
    }
