"""How the replicas of a stage keep their weights together: the gradient exchange between them, per the
sync strategy the round's plan names (every-round reduce-scatter and all-gather, or all-to-all pulls)."""
