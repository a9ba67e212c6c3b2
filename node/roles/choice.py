"""Which role a node takes: a pipeline stage, or domain experts (HDEE) when the pipeline has what it needs.

`--role stage` hosts `--stages`; `--role expert` trains experts and needs no pipeline; `--role auto` (with
`--stages auto`) takes a stage while one has fewer than `--min-replicas` live replicas or no data node
serves, and trains experts otherwise. The pipeline comes first: an auto node training experts that sees a
stage run short stops at a checkpoint and restarts itself as that stage's replica (`Relaunch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from protocol.records import NodeRecord


class Role(str, Enum):
    AUTO = "auto"
    STAGE = "stage"
    EXPERT = "expert"


def replica_counts(members: dict[str, NodeRecord], num_stages: int) -> dict[int, int]:
    counts = {s: 0 for s in range(num_stages)}
    for record in members.values():
        if record.plannable:  # an unreachable replica takes no hops: the stage still needs one
            for s in record.stages:
                if s in counts:
                    counts[s] += 1
    return counts


def stage_in_need(members: dict[str, NodeRecord], num_stages: int, min_replicas: int) -> int | None:
    """The stage the pipeline needs most: no data node means stage 0, else the shortest stage under the minimum."""
    counts = replica_counts(members, num_stages)
    if counts[0] == 0:
        return 0
    short = [s for s, n in counts.items() if n < min_replicas]
    return min(short, key=lambda s: (counts[s], s)) if short else None


def fewest_replicas(members: dict[str, NodeRecord], num_stages: int) -> int:
    counts = replica_counts(members, num_stages)
    return min(counts, key=lambda s: (counts[s], s))


def choose_stages(role: str, explicit: list[int] | None, members: dict[str, NodeRecord], num_stages: int,
                  min_replicas: int) -> list[int]:
    """Stages to host; empty for the expert role. An explicit --stages list means the operator chose stages."""
    if role == Role.EXPERT:
        return []
    if explicit is not None:
        return explicit
    if role == Role.STAGE:
        return [fewest_replicas(members, num_stages)]
    need = stage_in_need(members, num_stages, min_replicas)
    return [] if need is None else [need]


@dataclass(frozen=True)
class Relaunch:
    """A role change: the node restarts its own process with these flags appended (node/commands/run.py).

    A new process rather than a swap in place, because a started gRPC server cannot drop the old role's
    handlers, and the old role's model, optimizer and activations return their memory only with the process.
    """

    role: Role
    stage: int | None = None  # None: --stages auto

    def args(self) -> list[str]:
        """Appended to the node's command line: the last flag wins."""
        return ["--role", self.role.value, "--stages", "auto" if self.stage is None else str(self.stage)]
