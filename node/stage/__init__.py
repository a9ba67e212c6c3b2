"""A stage node's compute and its books: the executor (admission, round ledger, compute thread), the activation
store, the origin (a data node's microbatches) and the trainer (parameters and optimizer of a hosted stage).
"""
