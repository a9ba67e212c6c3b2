"""What runs when: the round loop (plan, execute, reduce, step), planning through `routing/`, discovery of members and
plans in the DHT, measured links, replica averaging, where a stage's state is restored from, and checkpoints.
"""
