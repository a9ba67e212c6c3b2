"""What may enter this node's compute: hops the round's signed plan has, along verified members, carrying
tensors of the swarm's dtype and shapes.

`HopAdmission` is checked by the servicer after the envelope's structure and before the executor reserves
memory, so a client that invents microbatches, or paths through addresses of its choosing, costs a
dictionary lookup. A path that differs from the plan's (a re-route) is accepted only if every hop is a
verified member at the endpoint it announced. The tensor checks run in the executor, before a hop is queued.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import grpc
import torch

from node.config import DataPlaneConfig
from protocol.errors import ProtocolError, invalid
from protocol.envelope import path_of
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.records import Reach, RoundPlan

if TYPE_CHECKING:
    from transformers import LlamaConfig

    from node.control.discovery import SwarmDirectory


class HopAdmission:
    def __init__(self, directory: SwarmDirectory, settings: DataPlaneConfig):
        self.directory = directory
        self.plan_lookup_retry = settings.plan_lookup_retry  # a lacking plan or member is looked up at most this often
        self.members_refresh = settings.members_refresh  # seconds a read of the verified members is reused
        self.plans_kept = settings.plans_kept
        self._plans: dict[int, RoundPlan] = {}
        self._looked_up: dict[int, float] = {}
        self._members: dict[str, tuple[str, bool]] = {}  # verified peer id -> (endpoint, whether relayed)
        self._members_at = float("-inf")
        self._lock = threading.Lock()

    def check(self, env: pb.Envelope) -> None:
        plan = self._plan(env.round)
        if plan is None:  # the plan may still be on its way through the DHT: the sender retries
            raise ProtocolError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"this node has no plan for round {env.round} yet; retry shortly")
        planned = next((mb for mb in plan.microbatches if mb.id == env.microbatch), None)
        if planned is None or planned.origin != env.path[0].peer_id:
            raise ProtocolError(grpc.StatusCode.NOT_FOUND,
                                f"microbatch {env.microbatch} from {env.path[0].peer_id[-8:]} is not in round "
                                f"{env.round}'s plan")
        path = path_of(env)
        if path == planned.path:
            return
        members = self._verified_members()
        if any(members.get(hop.peer_id, (None,))[0] != hop.endpoint for hop in path):
            # A member may have moved (behind NAT, to another relay) since our last read: read once more.
            members = self._verified_members(max_age=self.plan_lookup_retry)
        for hop in path:
            endpoint, relayed = members.get(hop.peer_id, (None, False))
            # A relayed member's endpoint moves with its relay, and a path may name one it left: senders dial
            # the endpoint the member's own record announces (StageClients.follow), so its peer id suffices.
            if endpoint != hop.endpoint and not relayed:
                raise ProtocolError(grpc.StatusCode.PERMISSION_DENIED,
                                    f"path goes through {hop.endpoint} ({hop.peer_id[-8:]}), which is not a "
                                    f"verified member of the swarm at that address")

    def check_reroute(self, notice: pb.RerouteNotice, sender: str) -> None:
        """A re-route (or a give-up) comes only from its microbatch's origin in the round's signed plan."""
        planned = self._planned(notice.round, notice.microbatch, "Reroute")
        if sender != planned.origin:
            raise ProtocolError(grpc.StatusCode.PERMISSION_DENIED,
                                f"Reroute of round {notice.round} microbatch {notice.microbatch} from {sender[-8:]}: "
                                f"only its origin {planned.origin[-8:]} re-routes it")

    @staticmethod
    def check_round_done(notice: pb.RoundDoneNotice, sender: str) -> None:
        """An origin says only for itself that it is done. (The round ledger waits only for the origins of the
        round's plan, so a peer that is none changes nothing by saying it; no plan is needed here, which matters
        for a node that gets the notice before it has fetched that round's plan.)"""
        if sender != notice.origin:
            raise ProtocolError(grpc.StatusCode.PERMISSION_DENIED,
                                f"RoundDone for {notice.origin[-8:]} in round {notice.round} from {sender[-8:]}: "
                                f"an origin says only for itself that it is done")

    def know(self, plan: RoundPlan) -> None:
        """A plan the round loop fetched and verified: hops and re-routes of its round need no DHT lookup."""
        with self._lock:
            self._plans[plan.round] = plan
            for old in sorted(self._plans)[:-self.plans_kept]:
                del self._plans[old]

    def known(self, round_: int) -> RoundPlan | None:
        """The round's plan if this node has it, without a DHT lookup."""
        with self._lock:
            return self._plans.get(round_)

    def _planned(self, round_: int, microbatch: int, method: str):
        plan = self._known_plan(round_, method)
        planned = next((mb for mb in plan.microbatches if mb.id == microbatch), None)
        if planned is None:
            raise ProtocolError(grpc.StatusCode.NOT_FOUND,
                                f"{method}: microbatch {microbatch} is not in round {round_}'s plan")
        return planned

    def _known_plan(self, round_: int, method: str) -> RoundPlan:
        plan = self._plan(round_)
        if plan is None:
            raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{method}: this node has no signed plan for round {round_}")
        return plan

    def _plan(self, round_: int) -> RoundPlan | None:
        with self._lock:
            plan = self._plans.get(round_)
            looked_up = self._looked_up.get(round_, float("-inf"))
            if plan is not None or time.monotonic() - looked_up < self.plan_lookup_retry:
                return plan
            self._looked_up[round_] = time.monotonic()
        plan = self.directory.fetch_plan(round_)
        if plan is not None:
            self.know(plan)
        with self._lock:
            for old in [r for r in self._looked_up if r < round_ - self.plans_kept]:
                del self._looked_up[old]
        return plan

    def _verified_members(self, max_age: float | None = None) -> dict[str, tuple[str, bool]]:
        """peer id -> (endpoint, relayed) of the swarm's verified members, read at most `max_age` seconds ago
        (--members-refresh by default)."""
        with self._lock:
            if time.monotonic() - self._members_at < (self.members_refresh if max_age is None else max_age):
                return self._members
        members = {p: (r.endpoint, r.reach is Reach.RELAYED) for p, r in self.directory.members().items()}
        with self._lock:
            self._members, self._members_at = members, time.monotonic()
        return members


# ---- tensors (raise ProtocolError to refuse) --------------------------------------------------------------------
def check_hidden(tensor: torch.Tensor, dtype: torch.dtype, config: LlamaConfig) -> None:
    """Activations between stages: [batch, seq, hidden] in the swarm's dtype, no longer than the model allows."""
    if tensor.dtype != dtype:
        raise invalid(f"activations are {dtype_name(tensor.dtype)}; this swarm computes in {dtype_name(dtype)}")
    if tensor.dim() != 3 or tensor.shape[2] != config.hidden_size:
        raise invalid(f"activations of shape {list(tensor.shape)}; expected [batch, seq, {config.hidden_size}]")
    if tensor.shape[1] > config.max_position_embeddings:
        raise invalid(f"sequence of {tensor.shape[1]} tokens exceeds the model's "
                      f"{config.max_position_embeddings}")


def check_final(env: pb.Envelope, hidden: torch.Tensor, labels: torch.Tensor | None) -> None:
    """The last hop returns to its origin, which must hold `labels` of the matching [batch, seq]."""
    if labels is None:
        raise ProtocolError(grpc.StatusCode.NOT_FOUND,
                            f"round {env.round} microbatch {env.microbatch} did not start at this origin")
    if tuple(hidden.shape[:2]) != tuple(labels.shape):
        raise invalid(f"activations of shape {list(hidden.shape)} do not match this microbatch's labels "
                      f"{list(labels.shape)}")


def check_gradient(grad: torch.Tensor, outputs: torch.Tensor) -> None:
    """A gradient must match the kept output it is for, in shape and dtype."""
    if grad.shape != outputs.shape or grad.dtype != outputs.dtype:
        raise invalid(f"gradient of shape {list(grad.shape)} {dtype_name(grad.dtype)} does not match the output "
                      f"{list(outputs.shape)} {dtype_name(outputs.dtype)}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
