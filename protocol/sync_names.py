"""The sync strategies this version speaks, by name (config, records, status).

- `every-round`: each round, reduce-scatter then all-gather among the stage's replicas in the plan;
  each replica sends and receives about 2·G·(n-1)/n bytes for G bytes of gradients.
- `all-to-all`: each round, every replica pulls every other replica's whole gradient, (n-1)·G bytes
  (the swarm's first averaging; kept as the baseline benches compare against).

Order matters: on a tie between members' preferences, the earlier one wins (node/sync/agreement.py).
"""

SYNC_NAMES: tuple[str, ...] = ("every-round", "all-to-all")
EVERY_ROUND, ALL_TO_ALL = SYNC_NAMES
