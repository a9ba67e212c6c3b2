"""The outer loop (`--sync outer`, DiLoCo: arXiv 2311.08105): a stage's anchor, outer momentum and residual.

Between syncs each replica steps on its own gradients (the inner AdamW). Every H rounds, after the step of a
round r with (r + 1) % H == 0, a replica computes its pseudo-gradient, the anchor (the weights at the last
sync) minus its weights, adds the error-feedback residual, and posts it coded (`--sync-codec`); what the codec
lost becomes the next residual, so no part of any update is dropped, only delayed. The replicas average the
pseudo-gradients (node/sync/averaging.py, reduce-scatter then all-gather) in the background while round r + 1
computes, and after round r + 1's step every replica applies the same outer Nesterov step to the anchor:

    m <- mu * m + g;   anchor <- anchor - lr * (g + mu * m);   weights <- anchor + (weights - weights at r)

The last term keeps round r + 1's own progress, made while the sync travelled (a one-round delay, as in
DiLoCoX's overlap), so the pipeline never waits for the sync unless it takes longer than a round. Replicas
that averaged the same values hold bit-identical anchors; their weights differ between syncs, and drift
repair (the digest vote) compares anchors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from node.stage.digest import tensors_digest
from node.sync.averaging import flatten, roundtrip, unflatten


@dataclass(frozen=True)
class OuterStep:
    """The outer optimizer's numbers (SyncConfig)."""

    lr: float
    momentum: float


class OuterState:
    """One stage's outer state. Not thread-safe: its trainer calls it under the trainer's lock."""

    def __init__(self, params: list[torch.Tensor]):
        self.anchor = [p.detach().to(torch.float32).clone() for p in params]  # float32 even for bf16 weights
        self.momentum = [torch.zeros_like(p) for p in params]
        self.residual = torch.zeros(sum(p.numel() for p in params))  # float32, flattened, on the CPU
        self.last_sync = -1  # the round whose sync was last applied
        self.pending: int | None = None  # the round of the sync this replica began and has not applied yet
        # A sync the replica this state was copied from had in flight (begun, not applied): these weights lack
        # it, so the next round must copy them again from `missed_from` (None: any replica) once it applied it.
        self.missed: int | None = None
        self.missed_from: str | None = None
        self._digest: str | None = None

    def pseudo_gradient(self, params: list[torch.Tensor], codec: str, round_: int) -> torch.Tensor:
        """anchor - weights, plus the residual, flattened, for the sync of `round_`; keeps what `codec` will lose
        of it as the residual. Refuses (ValueError) a non-finite one: a replica whose weights blew up must not
        post them."""
        values = flatten([a - p.detach().to(torch.float32) for a, p in zip(self.anchor, params)]) + self.residual
        if not bool(torch.isfinite(values).all()):
            raise ValueError("the pseudo-gradient is not finite")
        self.residual = values - roundtrip(values, codec)
        self.pending = round_
        if self.missed == round_:  # copied right after the donor began this sync, and began it too: in step
            self.missed = self.missed_from = None
        return values

    def apply(self, mean: torch.Tensor, params: list[torch.Tensor], since: list[torch.Tensor], step: OuterStep,
              round_: int) -> None:
        """The outer Nesterov step with the group's mean pseudo-gradient (flattened), then the weights become the
        new anchor plus the progress made since `since` (the weights when the sync began)."""
        with torch.no_grad():
            for a, m, g, p, s in zip(self.anchor, self.momentum, unflatten(mean, self.anchor), params, since):
                m.mul_(step.momentum).add_(g)
                a.sub_(step.lr * (g + step.momentum * m))
                p.copy_(a + (p.to(torch.float32) - s.to(torch.float32)))
        self.last_sync = round_
        self.pending = None
        self._digest = None

    def drift(self, params: list[torch.Tensor]) -> float:
        """How far the weights moved from the anchor: ||weights - anchor|| / ||anchor||."""
        with torch.no_grad():
            moved = sum(float((p.detach() - a).double().pow(2).sum()) for p, a in zip(params, self.anchor))
            size = sum(float(a.double().pow(2).sum()) for a in self.anchor)
        return (moved / size) ** 0.5 if size else 0.0

    def digest(self) -> str:
        """sha256 over the anchor's bytes: equal digests mean replicas left the last sync in step."""
        if self._digest is None:
            self._digest = tensors_digest(self.anchor)
        return self._digest

    # ---- state transfer and checkpoints ----------------------------------------------------------------------
    def export(self, names: list[str], with_residual: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and metadata for FetchState and checkpoints. The residual is this replica's own unsent error:
        a checkpoint keeps it, a joining replica must not get it (it would send the donor's error twice)."""
        tensors = {f"outer/anchor/{n}": a.clone() for n, a in zip(names, self.anchor)}
        tensors.update({f"outer/momentum/{n}": m.clone() for n, m in zip(names, self.momentum)})
        if with_residual:
            tensors["outer/residual"] = self.residual.clone()
        metadata = {"outer_last_sync": str(self.last_sync)}
        if self.pending is not None:
            metadata["outer_pending"] = str(self.pending)
        return tensors, metadata

    @classmethod
    def load(cls, names: list[str], params: list[torch.Tensor], tensors: dict[str, torch.Tensor],
             metadata: dict[str, str], residual_of: "OuterState | None" = None,
             source: str | None = None) -> "OuterState | None":
        """The outer state in an export, or None when it has none (a swarm that never ran `outer`). An export
        without a residual (a replica's) keeps `residual_of`'s: that error is still this replica's to send.
        A sync the export had in flight is `missed`; `source` is the replica it came from (None: a checkpoint)."""
        if not names or f"outer/anchor/{names[0]}" not in tensors:
            return None
        state = cls(params)
        for n, p, a, m in zip(names, params, state.anchor, state.momentum):
            anchor, momentum = tensors.get(f"outer/anchor/{n}"), tensors.get(f"outer/momentum/{n}")
            if anchor is None or momentum is None or anchor.shape != p.shape or momentum.shape != p.shape:
                raise ValueError(f"outer state lacks a matching {n}")
            a.copy_(anchor)
            m.copy_(momentum)
        residual = tensors.get("outer/residual")
        if residual is None and residual_of is not None:
            residual = residual_of.residual
        if residual is not None:
            if residual.shape != state.residual.shape:
                raise ValueError("outer residual does not match the stage")
            state.residual = residual.to(torch.float32).clone()
        state.last_sync = int(metadata.get("outer_last_sync", "-1"))
        if "outer_pending" in metadata:
            state.missed, state.missed_from = int(metadata["outer_pending"]), source
        return state
