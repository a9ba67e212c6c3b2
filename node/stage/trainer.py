"""A hosted stage's parameters, optimizer and round-to-round state."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from lm.stage import PipelineStage
from node.config import TrainingConfig
from node.process.waits import wait_until
from node.stage.digest import tensors_digest
from node.sync.outer import OuterState, OuterStep


class StageTrainer:
    def __init__(self, module: PipelineStage, settings: TrainingConfig, recheck_s: float):
        self.module = module
        self.recheck_s = recheck_s  # how often a waiting FetchState looks whether its caller is still there
        self.stage = module.stage
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.grad_clip = settings.grad_clip
        self.base_lr = settings.lr
        self.warmup_rounds = settings.warmup_rounds
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.completed_round = -1  # the last round whose step this stage has taken
        self.last_grad_norm = 0.0  # CheckFree weighs a neighbour's layers by it
        # Held while parameters change, so a joining replica never copies a half-applied step.
        self.lock = threading.Condition()
        self._digest: str | None = None  # cached until the parameters change
        self.outer: OuterState | None = None  # the outer loop's state, from the first round run under `outer`
        self._closed = False

    def lr_at(self, round_: int) -> float:
        if self.warmup_rounds <= 0:
            return self.base_lr
        return self.base_lr * min(1.0, (round_ + 1) / self.warmup_rounds)

    def grads(self) -> list[torch.Tensor]:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def set_grads(self, grads: list[torch.Tensor]) -> None:
        with self.lock:
            for p, g in zip(self.params, grads):
                p.grad = g.to(dtype=p.dtype, device=p.device)

    def step(self, round_: int, complete: bool = True) -> float:
        """Clip, step and clear gradients; returns the gradient norm before clipping. `complete=False`: the round
        is not over for this stage yet (a sync is still to be applied or begun: call `complete`)."""
        with self.lock:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(round_)
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.last_grad_norm = float(norm)
            self._digest = None
        if complete:
            self.complete(round_)
        return float(norm)

    def skip(self, round_: int, complete: bool = True) -> None:
        """A round in which this stage took no step (nothing reached it): keep the round count aligned."""
        with self.lock:
            self.optimizer.zero_grad(set_to_none=True)
        if complete:
            self.complete(round_)

    def complete(self, round_: int) -> None:
        """This stage's state is final for `round_`: a replica waiting to copy the state after it may."""
        with self.lock:
            self.completed_round = round_
            self.lock.notify_all()

    # ---- the outer loop (node/sync/outer.py) ------------------------------------------------------------------
    def start_outer(self) -> None:
        """Under `outer` from now on: the anchor is the weights now, unless a sync (or a state copy) set it."""
        with self.lock:
            if self.outer is None:
                self.outer = OuterState(self.params)

    def begin_sync(self, codec: str, round_: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(this replica's pseudo-gradient to post for the sync of `round_`, the weights it was taken from);
        ValueError if not finite."""
        with self.lock:
            assert self.outer is not None, "start_outer first"
            return self.outer.pseudo_gradient(self.params, codec, round_), [p.detach().clone() for p in self.params]

    def abandon_sync(self) -> None:
        """The sync this replica began will not be applied (its replicas moved on to another strategy)."""
        with self.lock:
            if self.outer is not None:
                self.outer.pending = None

    def forget_missed_sync(self) -> None:
        with self.lock:
            if self.outer is not None:
                self.outer.missed = self.outer.missed_from = None

    def missed_sync(self) -> tuple[int, str | None] | None:
        """(round, replica) of a sync these weights lack because they were copied while it was in flight."""
        with self.lock:
            if self.outer is None or self.outer.missed is None:
                return None
            return self.outer.missed, self.outer.missed_from

    def apply_sync(self, mean: torch.Tensor, since: list[torch.Tensor], step: OuterStep, round_: int) -> None:
        with self.lock:
            assert self.outer is not None, "start_outer first"
            self.outer.apply(mean, self.params, since, step, round_)
            self._digest = None
            self.lock.notify_all()

    def anchor_digest(self) -> str:
        """The digest replicas compare under `outer` (their weights differ between syncs by design)."""
        with self.lock:
            return self.outer.digest() if self.outer is not None else self.digest()

    def drift(self) -> float:
        with self.lock:
            return self.outer.drift(self.params) if self.outer is not None else 0.0

    def wait_completed(self, round_: int, timeout: float, cancelled: Callable[[], bool] = lambda: False) -> bool:
        """Block until this stage has finished `round_` (for a replica that wants a state after it).

        Gives up (False) after `timeout` seconds, once `cancelled()` is true, or when the trainer is closed.
        """
        return wait_until(self.lock, lambda: self.completed_round >= round_, timeout, self.recheck_s,
                          lambda: self._closed or cancelled())

    def close(self) -> None:
        """The node is stopping: wake and fail every `wait_completed`."""
        with self.lock:
            self._closed = True
            self.lock.notify_all()

    def rebuilt(self) -> None:
        """The weights were just rebuilt from elsewhere (CheckFree): their optimizer and outer history no longer
        apply. The caller holds the lock."""
        self.optimizer.state.clear()
        self.outer = None
        self._digest = None

    def digest(self) -> str:
        """sha256 over the parameters' bytes: equal digests mean bit-identical replicas."""
        with self.lock:
            if self._digest is None:
                self._digest = tensors_digest(self.params)
            return self._digest

    def export(self, include_grads: bool = False,
               include_residual: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """A snapshot of parameters, AdamW moments and the outer state, for a joining replica or a checkpoint
        (`include_residual`: this replica's own error feedback, which only its own checkpoint may keep).

        Copied under the lock that `step` takes, so the caller can serialise it at leisure while the next
        step runs: never a half-applied step.
        """
        with self.lock, torch.no_grad():
            tensors, metadata = self._export(include_grads)
            if self.outer is not None:
                outer_tensors, outer_metadata = self.outer.export(self.names, include_residual)
                tensors.update(outer_tensors)
                metadata.update(outer_metadata)
            return tensors, metadata

    def _export(self, include_grads: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors: dict[str, torch.Tensor] = {}
        steps = {}
        for name, p in zip(self.names, self.params):
            tensors[f"param/{name}"] = p.detach().clone()
            state = self.optimizer.state.get(p, {})
            if "exp_avg" in state:
                tensors[f"exp_avg/{name}"] = state["exp_avg"].clone()
                tensors[f"exp_avg_sq/{name}"] = state["exp_avg_sq"].clone()
                steps[name] = float(state["step"])
            if include_grads and p.grad is not None:
                tensors[f"grad/{name}"] = p.grad.detach().clone()
        metadata = {"completed_round": str(self.completed_round), "stage": str(self.stage),
                    "grad_norm": repr(self.last_grad_norm),
                    "steps": ",".join(f"{n}={s}" for n, s in steps.items())}
        return tensors, metadata

    def load(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str | None = None) -> None:
        """Take a state `export`ed by `source` (a replica's peer id; None: this node's own checkpoint)."""
        steps = dict(item.split("=") for item in metadata.get("steps", "").split(",") if item)
        with self.lock, torch.no_grad():
            for name, p in zip(self.names, self.params):
                key = f"param/{name}"
                if key not in tensors or tensors[key].shape != p.shape:
                    raise ValueError(f"state for stage {self.stage} lacks a matching {name}")
                p.copy_(tensors[key])
                if f"exp_avg/{name}" in tensors:
                    self.optimizer.state[p] = {
                        "step": torch.tensor(float(steps[name])),
                        "exp_avg": tensors[f"exp_avg/{name}"].to(p.device, p.dtype).clone(),
                        "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].to(p.device, p.dtype).clone(),
                    }
            self.completed_round = int(metadata.get("completed_round", "-1"))
            # A state from a replica carries no residual: this replica keeps its own error feedback.
            self.outer = OuterState.load(self.names, self.params, tensors, metadata, residual_of=self.outer,
                                         source=source)
            self._digest = None
