"""The swarm-node daemon: lifecycle, roles, the round loop, metrics and the CLI.

`node` wires together `lm` (model stages, tokenizer, data), `protocol` (wire semantics),
`routing` (path planning) and `experts` (HDEE). None of those import `node`.
"""

VERSION = "0.1.0"  # this node's software version, announced in records and Info replies
