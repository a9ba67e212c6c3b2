"""The sync strategies this version speaks, by name (config, records, status).

- `every-round`: each round, reduce-scatter then all-gather among the stage's replicas in the plan;
  each replica sends and receives about 2·G·(n-1)/n bytes for G bytes of gradients.
- `all-to-all`: each round, every replica pulls every other replica's whole gradient, (n-1)·G bytes
  (the swarm's first averaging; kept as the baseline benches compare against).
- `outer` (DiLoCo, arXiv 2311.08105): each replica steps on its own gradients; every H rounds (the plan's
  `sync_every`) the replicas average their pseudo-gradients (anchor minus weights), compressed with error
  feedback, by reduce-scatter and all-gather, overlapped with the next round's compute, and every replica
  takes the same outer Nesterov step on the anchor (node/sync/outer.py).

Order matters: on a tie between members' preferences, the earlier one wins (node/sync/agreement.py).
"""

SYNC_NAMES: tuple[str, ...] = ("every-round", "all-to-all", "outer")
EVERY_ROUND, ALL_TO_ALL, OUTER = SYNC_NAMES
